"""Fault injection against ``relay serve`` on Ray (opt-in: ``make test PYTEST_ARGS="-m slow -k
serve_faults"``, about 4 minutes on 2 cores).

For each placement -- fused and staged, with 1- and 2-rank groups -- a real server process runs
one undisturbed request, then the same request again while the test SIGKILLs a worker process of
the group that is running it and, after the rebuild, SIGSTOPs (hangs) a worker of the group then
busy. Every request must complete with frames equal to the undisturbed run, health must stay
SERVING, and no stopped or orphaned worker process may remain, during the run or after the drain.
Worker pids come from the server's own log ("group NAME built ...: pids [...]").
"""

from __future__ import annotations

import ast
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from relay.serve.gen.relay.v1 import relay_pb2 as pb

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(height=32, width=32, frames=5, steps=10, seed=17, guidance=4.0, guidance_low=3.0, shift=5.0)
FAULT_STEPS = (2, 6)  # SIGKILL after step 2, SIGSTOP after step 6 (past the first rebuild)
PLACEMENTS = {
    "fused-1": [],
    "fused-2": ["--nproc", "2", "--ulysses", "2"],
    "staged-1": ["--placement", "staged", "--stage-split", "1:1"],
    "staged-2": ["--placement", "staged", "--stage-split", "2:2"],
}
BUILT = re.compile(r"group (\w+) built \(ray, build (\d+)\) .*pids (\[[0-9, ]+\])")


def _pids(log_path: Path) -> dict[str, list[int]]:
    """The newest pids of each group, from the server log."""
    out = {}
    for match in BUILT.finditer(log_path.read_text()):
        out[match.group(1)] = ast.literal_eval(match.group(3))
    return out


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _gone(pid: int) -> bool:
    return _state(pid) in (None, "Z")


def _health(target: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_serve_faults_kill_and_hang_the_busy_group(placement, tiny_models, tmp_path):
    from relay.cli.service import _wait_serving
    from relay.serve.client import RelayClient

    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve", "--model", str(tiny_models["t2v"]), "--port", "0",
         "--port-file", str(port_file), "--dtype", "fp32", "--device", "cpu", "--executor", "ray",
         "--step-timeout", "8", "--max-retries", "3", "--grace", "30", *PLACEMENTS[placement]],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    faulted: list[int] = []
    try:
        port = _wait_serving(server, port_file, timeout_s=300)
        target = f"127.0.0.1:{port}"
        request = pb.GenerateRequest(prompt="a red kite over the sea", output_format=pb.OUTPUT_FORMAT_NPY, **SETTINGS)
        with RelayClient(target) as client:
            undisturbed = np.load(io.BytesIO(client.generate(request, timeout=600).data))
            events, done = [], threading.Event()

            def stream():
                for event in client.stub.Generate(request, timeout=600):
                    events.append(event)
                done.set()

            thread = threading.Thread(target=stream, daemon=True)
            thread.start()
            for step, action in zip(FAULT_STEPS, (signal.SIGKILL, signal.SIGSTOP)):
                while not done.is_set() and not any(e.HasField("progress") and e.progress.step >= step
                                                    for e in list(events)):
                    time.sleep(0.01)
                assert not done.is_set(), "the request ended before the fault"
                busy = [e.progress.group for e in list(events) if e.HasField("progress")][-1]
                victim = _pids(log_path)[busy][-1]  # the last rank of the busy group
                os.kill(victim, action)
                faulted.append(victim)
                assert _health(target) == 1  # SERVING while the group is rebuilt
                builds = log_path.read_text().count(f"group {busy} built")
                while not done.is_set() and log_path.read_text().count(f"group {busy} built") == builds:
                    time.sleep(0.05)  # the rebuild is in the log before the next fault
            thread.join(timeout=600)
        data = b"".join(e.video_chunk.data for e in events if e.HasField("video_chunk"))
        assert events and events[-1].HasField("done"), [e.WhichOneof("event") for e in events[-5:]]
        assert np.array_equal(np.load(io.BytesIO(data)), undisturbed)
        assert all(_gone(pid) for pid in faulted), {pid: _state(pid) for pid in faulted}
        assert _health(target) == 1
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    text = log_path.read_text()
    assert text.count("built (ray") >= 2 + len(FAULT_STEPS) - (1 if placement.startswith("fused") else 0), text[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("a worker process outlived the server")
