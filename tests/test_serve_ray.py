"""``relay serve`` on worker groups: the real server process -- on Ray actors in a staged
placement, on local processes, under torchrun -- serves streams whose frames equal the
single-process engine's, reports which group ran each step, and drains on SIGTERM leaving no
worker process behind."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from relay.serve.gen.relay.v1 import relay_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
FAST = dict(height=32, width=32, frames=5, steps=6, guidance=4.0, guidance_low=3.0, shift=5.0)


def test_staged_service_streams_equal_frames_and_drains(tiny_models, tmp_path):
    from relay.engine import Engine, GenerationRequest, load_model
    from relay.cli.service import _wait_serving
    from relay.serve.client import RelayClient

    before = _rank_actors()  # other Ray sessions on this machine are not this server's
    port_file = tmp_path / "port"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve", "--model", str(tiny_models["t2v"]), "--port", "0",
         "--port-file", str(port_file), "--dtype", "fp32", "--device", "cpu", "--executor", "ray",
         "--placement", "staged", "--stage-split", "1:1", "--grace", "30"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = _wait_serving(server, port_file)
        client = RelayClient(f"127.0.0.1:{port}")
        seeds = (21, 22, 23)

        def one(seed):
            request = pb.GenerateRequest(prompt="a red kite over the sea", seed=seed,
                                         output_format=pb.OUTPUT_FORMAT_NPY, **FAST)
            return client.generate(request, timeout=600)

        with ThreadPoolExecutor(3) as pool:
            try:
                results = list(pool.map(one, seeds))
            except Exception as exc:  # the server's side of the story, for the report
                log.flush()
                raise AssertionError(f"{exc!r}\nserver log:\n{(tmp_path / 'serve.log').read_text()[-4000:]}") from exc
        engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
        for seed, result in zip(seeds, results):
            expected = engine.generate(GenerationRequest(prompt="a red kite over the sea", seed=seed, **FAST))
            got = np.load(io.BytesIO(result.data))
            assert float(np.abs(got - expected).max()) <= 1e-5
            groups = [e.progress.group for e in result.events if e.HasField("progress")]
            assert groups == ["high"] * 3 + ["low"] * 3
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "staged placement" in text and "drained and stopped" in text, text[-3000:]
    assert not _rank_actors() - before


def _rank_actors() -> set[int]:
    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"RankActor" in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("flags, backend", [
    (["--executor", "local", "--nproc", "2", "--ulysses", "2"], "mp"),
    (["--executor", "torchrun", "--nproc", "2", "--cfg-parallel", "2"], "torchrun"),
], ids=["local-processes", "torchrun"])
def test_service_on_a_process_group_equals_the_engine_and_drains(tiny_models, tmp_path, flags, backend):
    import os

    from google.protobuf.json_format import MessageToDict

    from relay.cli.service import _wait_serving
    from relay.engine import Engine, GenerationRequest, load_model
    from relay.serve.client import RelayClient

    port_file = tmp_path / "port"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve", "--model", str(tiny_models["t2v"]), "--port", "0",
         "--port-file", str(port_file), "--dtype", "fp32", "--device", "cpu", "--grace", "30", *flags],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = _wait_serving(server, port_file)
        request = pb.GenerateRequest(prompt="a red kite over the sea", seed=31, output_format=pb.OUTPUT_FORMAT_NPY,
                                     **FAST)
        with RelayClient(f"127.0.0.1:{port}") as client:
            result = client.generate(request, timeout=600)
        expected = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu")).generate(
            GenerationRequest(prompt="a red kite over the sea", seed=31, **FAST))
        assert float(np.abs(np.load(io.BytesIO(result.data)) - expected).max()) <= 1e-4
        stats = MessageToDict(result.done.stats)
        assert stats["layout"]["executor"] == backend and stats["layout"]["groups"][0]["ranks"] == 2
        assert len(stats["memory"]["fused0"]) == 2
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "drained and stopped" in text, text[-3000:]
    deadline = time.monotonic() + 30  # the ranks leave after the server (a barrier would need them)
    while time.monotonic() < deadline and _session_alive(server.pid):
        time.sleep(0.2)
    assert not _session_alive(server.pid), "a worker process outlived the server"


def _session_alive(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("flags, message", [
    (["--executor", "torchrun", "--placement", "staged"], "--executor: torchrun runs one group"),
    (["--executor", "torchrun", "--model", "second"], "--executor: torchrun serves one model"),
    (["--port", "80", "--ulysses", "3", "--nproc", "3"], "--ulysses: 3 must divide"),
    (["--executor", "ray", "--placement", "staged", "--stage-split", "2:0"], "--stage-split:"),
    (["--executor", "ray", "--layout", "ulysses=x"], "--layout: ulysses must be an integer"),
])
def test_serve_placement_errors_exit_2(relay, tiny_models, flags, message):
    result = relay("serve", "--model", tiny_models["t2v"], "--port", "0", *flags)
    assert result.code == 2 and message in result.err, result.err
