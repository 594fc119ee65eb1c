"""The gRPC service with a real server on 127.0.0.1 and real clients."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from relay.serve.gen.relay.v1 import relay_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
FAST = dict(height=32, width=32, frames=5, steps=4, seed=7, guidance=4.0, guidance_low=3.0, shift=5.0)


class LiveServer:
    """A Relay server on its own event loop thread, with the engine reachable for counters."""

    def __init__(self, model_dir, *, max_queue=8, heartbeat_s=5.0, tokens=(), lora_dir=None, staged=False):
        from relay.engine.loader import load_tokenizer
        from relay.engine.model_info import read_model_info
        from relay.engine.scheduled import ScheduledRunner
        from relay.engine.service import AsyncEngine
        from relay.launch.executor import Executor
        from relay.launch.placement import plan_groups
        from relay.launch.worker import WorkerSpec
        from relay.parallel.layout import ParallelLayout
        from relay.serve.server import RelayServer, ServerConfig

        self.loop = asyncio.new_event_loop()
        self.model_dir = model_dir
        self.tokens = list(tokens)
        info = read_model_info(model_dir)
        self.name = info.path.name
        # The same runtime as relay serve: a stage scheduler over an in-process group, or over
        # a high-noise and a low-noise group in two worker processes (staged).
        if staged:
            from relay.engine.request import GenerationRequest, resolve_request

            reference = resolve_request(GenerationRequest(prompt="reference", seed=0), info)
            placement = plan_groups(info, reference, placement="staged", stage_split="1:1")
        else:
            placement = plan_groups(info, None, layout=ParallelLayout())
        self.executor = Executor(placement, WorkerSpec(model=str(info.path), layout=ParallelLayout(), dtype="fp32"),
                                 backend="mp" if staged else "inprocess")
        runners = {self.name: ScheduledRunner(self.executor.scheduler, info, name=self.name,
                                              tokenizer=load_tokenizer(info))}
        ready = threading.Event()

        async def boot():
            self.engine = AsyncEngine(runners, default_model=self.name, max_queue=max_queue,
                                      heartbeat_s=heartbeat_s, lora_dir=lora_dir)
            self.server = RelayServer(self.engine, {self.name: info},
                                      ServerConfig(host="127.0.0.1", port=0, tokens=list(tokens)))
            await self.server.start()
            self.engine.start()
            self.engine.ready = True
            await self.server.set_serving(True)
            ready.set()

        self.thread = threading.Thread(target=self._run, args=(boot,), daemon=True)
        self.thread.start()
        assert ready.wait(60)
        self.target = f"127.0.0.1:{self.server.port}"

    def _run(self, boot):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(boot())
        self.loop.run_forever()

    def start_http(self) -> str:
        """Starts the HTTP videos API beside the gRPC server (same engine and tokens, port 0);
        returns its base URL (``stop`` stops it too)."""
        from relay.engine.model_info import read_model_info
        from relay.serve.http import HttpServer

        self.http = HttpServer(self.engine, {self.name: read_model_info(self.model_dir)}, host="127.0.0.1", port=0,
                               tokens=self.tokens)
        port = asyncio.run_coroutine_threadsafe(self.http.start(), self.loop).result(30)
        self.http_url = f"http://127.0.0.1:{port}"
        return self.http_url

    def call(self, fn):
        """Runs ``fn()`` on the server loop and returns its result (reads engine state safely)."""
        return asyncio.run_coroutine_threadsafe(_wrap(fn), self.loop).result(10)

    def wait_idle(self, timeout=30.0):
        """Until no job is queued or running and no stream is open (a barrier, not a guess)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(lambda: self.engine.active_jobs == 0 and self.engine.open_streams == 0):
                return True
            time.sleep(0.02)
        return False

    def stop(self):
        if getattr(self, "http", None) is not None:
            asyncio.run_coroutine_threadsafe(self.http.stop(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.server.server.stop(0), self.loop).result(10)
        # The engine's scheduler and sweeper end (drain awaits their cancellation): the loop
        # stops with no task pending.
        asyncio.run_coroutine_threadsafe(self.engine.drain(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.executor.close()


async def _wrap(fn):
    return fn()


@pytest.fixture(scope="module")
def live(tiny_models):
    server = LiveServer(tiny_models["t2v"], max_queue=60, heartbeat_s=0.2)
    yield server
    server.stop()


@pytest.fixture
def client(live):
    from relay.serve.client import RelayClient

    with RelayClient(live.target) as c:
        yield c


def _request(**fields):
    return pb.GenerateRequest(prompt="a red kite over the sea", **fields)


def _health(target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_done_event_carries_the_run_stats(client):
    """The service's ``done`` event has the same run stats document as ``relay generate --stats``."""
    from google.protobuf.json_format import MessageToDict

    result = client.generate(_request(output_format=pb.OUTPUT_FORMAT_NPY, **dict(FAST, guidance_low=1.0)))
    stats = MessageToDict(result.done.stats)
    assert stats["version"] == 1 and stats["layout"]["executor"] == "inprocess"
    assert stats["experts"]["high_noise"]["forwards"] + stats["experts"]["high_noise"]["skipped"] == \
        2 * stats["experts"]["high_noise"]["steps"]
    assert stats["experts"]["low_noise"]["forwards"] == stats["experts"]["low_noise"]["steps"]  # guidance 1
    assert sum(e["steps"] for e in stats["experts"].values()) == FAST["steps"]
    assert stats["decode"]["ranks"] == 1 and stats["memory"]["fused0"][0]["peak_bytes"] > 0
    assert stats["sources"]["steps"] == "request" and stats["settings"]["seed"] == FAST["seed"]
    assert {"queued", "encode", "high_noise", "low_noise", "handoff", "decode", "total"} <= set(stats["seconds"])


def test_stream_order_previews_and_frames_equal_generate(live, client, tiny_models):
    from PIL import Image

    from relay.engine import Engine, GenerationRequest, load_model

    result = client.generate(_request(output_format=pb.OUTPUT_FORMAT_NPY, preview_every=1, **FAST))
    kinds = [e.WhichOneof("event") for e in result.events]
    assert kinds[0] == "accepted" and kinds[-1] == "done"
    first_progress = kinds.index("progress")
    assert "started" in kinds[:first_progress]
    steps = [e.progress.step for e in result.events if e.HasField("progress")]
    assert steps == list(range(1, FAST["steps"] + 1))
    assert [e.progress.expert for e in result.events if e.HasField("progress")][0] == "high_noise"
    assert kinds.index("decoding") > max(i for i, k in enumerate(kinds) if k == "progress")
    assert all(k == "video_chunk" for k in kinds[kinds.index("decoding") + 1:-1])
    previews = [e.preview for e in result.events if e.HasField("preview")]
    assert [p.step for p in previews] == steps
    with Image.open(io.BytesIO(previews[-1].png)) as image:
        assert image.size == (previews[-1].width, previews[-1].height)
    assert result.settings.seed == FAST["seed"]
    frames = np.load(io.BytesIO(result.data))
    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    expected = engine.generate(GenerationRequest(prompt="a red kite over the sea", **FAST))
    assert np.array_equal(frames, expected)


def test_mp4_output_and_job_queries(client):
    result = client.generate(_request(**FAST))
    assert result.done.mime == "video/mp4" and result.data[4:8] == b"ftyp"
    job = client.get_job(result.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.step == FAST["steps"]
    models = client.list_models().models
    assert len(models) == 1 and models[0].is_default and models[0].kind == "t2v"
    with pytest.raises(grpc.RpcError) as caught:
        client.get_job("nope")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


BAD = [
    ("height", dict(height=30)), ("width", dict(width=100000)), ("frames", dict(frames=8)),
    ("steps", dict(steps=0)), ("steps", dict(steps=5000)), ("guidance", dict(guidance=float("nan"))),
    ("guidance", dict(guidance=float("inf"))), ("guidance_low", dict(guidance_low=-3.0)),
    ("shift", dict(shift=0.0)), ("boundary", dict(boundary=1.5)), ("fps", dict(fps=0)),
    ("seed", dict(seed=-5)), ("image", dict(image=b"not an image")), ("model", dict(model="nope")),
    ("preview_every", dict(preview_every=-1)), ("output_format", dict(output_format=7)),
    ("image", dict(image=_png((8000, 6000), mode="1"))),  # decompression bomb: 48 MP, a few KB
    ("image", dict(image=b"\x89PNG" + bytes(33 * 1024 * 1024))),  # over the 32 MiB limit
    ("height", dict(height=1 << 30)), ("frames", dict(frames=100_001)),
    ("client_request_id", dict(client_request_id="x" * 300)),
]


@pytest.mark.parametrize("field,fields", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_before_any_work(field, fields, live, client):
    before = live.call(lambda: live.engine.worker_calls)
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(pb.GenerateRequest(prompt="x", **fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}:")
    assert live.call(lambda: live.engine.worker_calls) == before
    assert _health(live.target) == 1  # SERVING


@pytest.mark.parametrize("prompt", ["", "   ", " ".join(["astronaut"] * 600)])
def test_bad_prompts(prompt, live, client):
    with pytest.raises(grpc.RpcError) as caught:
        client.generate(pb.GenerateRequest(prompt=prompt), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("prompt:")


def test_fuzzed_requests_never_yield_unknown_or_internal(live, client):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ints = st.one_of(st.none(), st.integers(-2**31, 2**31 - 1), st.sampled_from([16, 32, 5, 1, 2]))
    floats = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prompt=st.text(max_size=40), height=ints, width=ints, frames=ints, steps=st.one_of(
        st.none(), st.integers(-5, 3)), seed=st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
        guidance=floats, shift=floats, fps=ints, image=st.binary(max_size=64), fmt=st.integers(0, 5))
    def check(prompt, height, width, frames, steps, seed, guidance, shift, fps, image, fmt):
        request = pb.GenerateRequest(prompt=prompt, image=image, output_format=fmt)
        for name, value in (("height", height), ("width", width), ("frames", frames), ("steps", steps),
                            ("seed", seed), ("guidance", guidance), ("shift", shift), ("fps", fps)):
            if value is not None:
                setattr(request, name, value)
        try:
            client.generate(request, timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                exc.code(), exc.details())

    check()
    assert _health(live.target) == 1
    assert live.wait_idle()


def _stream_until(client, request, kind):
    """Starts a Generate call and returns it once an event of ``kind`` arrived."""
    call = client.stub.Generate(request, timeout=120)
    for event in call:
        if event.WhichOneof("event") == kind:
            return call, event
    raise AssertionError(f"no {kind} event")


LONG = dict(FAST, steps=400)


def test_cancel_running_and_queued_jobs(live, client):
    running, first = _stream_until(client, _request(**LONG), "progress")
    queued, accepted = _stream_until(client, _request(**LONG), "accepted")
    assert client.cancel(accepted.job_id).cancelled
    with pytest.raises(grpc.RpcError) as caught:
        list(queued)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert client.cancel(first.job_id).cancelled
    with pytest.raises(grpc.RpcError) as caught:
        list(running)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    assert live.wait_idle()
    job = client.get_job(first.job_id)
    assert job.state == pb.JOB_STATE_CANCELLED and job.step < LONG["steps"]


def test_client_gone_mid_stream_aborts_the_job(live, client):
    call, event = _stream_until(client, _request(**LONG), "progress")
    call.cancel()
    assert live.wait_idle()
    assert client.get_job(event.job_id).state == pb.JOB_STATE_CANCELLED


def test_deadline_shorter_than_the_job(live, client):
    """The client's deadline passes: the server cancels the job, before its last step."""
    call = client.stub.Generate(_request(**LONG), timeout=1.5)
    job_id = None
    with pytest.raises(grpc.RpcError) as caught:
        for event in call:
            job_id = job_id or event.job_id
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert live.wait_idle()
    job = client.get_job(job_id)
    assert job.state == pb.JOB_STATE_CANCELLED and job.step < LONG["steps"]


def test_a_stream_closed_at_a_yield_cancels_its_job(live):
    """When a deadline passes or a client goes while grpc is sending, grpc cancels its own task,
    not the servicer's generator: the generator is closed where it is parked, at a ``yield``,
    and no except clause in it runs. The job must be cancelled all the same."""
    from relay.serve.server import RelayServicer

    class Context:  # the two calls the servicer makes on a grpc.aio context
        def add_done_callback(self, callback):
            pass  # grpc calls it when the RPC ends; this test closes the stream instead

        async def abort(self, code, details):
            raise AssertionError(f"{code}: {details}")

    async def until_progress_then_close():
        stream = RelayServicer(live.engine, {}).Generate(_request(**LONG), Context())
        async for message in stream:
            if message.WhichOneof("event") == "progress":
                break
        await stream.aclose()
        return message.job_id

    job_id = asyncio.run_coroutine_threadsafe(until_progress_then_close(), live.loop).result(60)
    assert live.wait_idle()
    job = live.call(lambda: live.engine.jobs[job_id])
    assert job.state.name == "CANCELLED" and job.step < LONG["steps"]


def test_a_job_out_of_memory_is_resource_exhausted_and_the_server_keeps_serving(live, client):
    """The worker's allocator fails mid-step (the ``oom`` fault, armed for one seed): the call
    ends RESOURCE_EXHAUSTED with the message a user acts on, the job is FAILED with it, health
    stays SERVING, and the next job on the same group completes."""
    group = live.executor.groups[0]
    group.arm_fault({"action": "oom", "method": "advance", "at_step": 2, "seed": 4242})
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(client.stub.Generate(_request(**dict(FAST, seed=4242)), timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details()
        assert "out of memory on rank 0" in details and "32x32, 5 frames" in details
        assert "not retried" in details and "--offload" in details
        assert _health(live.target) == 1
        assert live.wait_idle()
        assert live.executor.scheduler.restarts[group.name] == 0  # one rank: the group was kept
        events = list(client.stub.Generate(_request(**FAST), timeout=60))
        assert events[-1].WhichOneof("event") == "done"
    finally:
        group.arm_fault(None)


def test_overload_refuses_exactly_the_excess(tiny_models):
    server = LiveServer(tiny_models["t2v"], max_queue=2)
    try:
        from relay.serve.client import RelayClient

        barrier = threading.Barrier(6)

        def one(_):
            with RelayClient(server.target) as c:
                barrier.wait()
                try:
                    c.generate(_request(**dict(FAST, steps=60)), timeout=120)
                    return "ok"
                except grpc.RpcError as exc:
                    return exc.code()

        with ThreadPoolExecutor(6) as pool:
            health_during = []
            futures = [pool.submit(one, i) for i in range(6)]
            while not all(f.done() for f in futures):
                health_during.append(_health(server.target))
            codes = [f.result() for f in futures]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
        assert codes.count("ok") == 3
        assert health_during and set(health_during) == {1}
    finally:
        server.stop()


def test_fifty_concurrent_streams_lose_no_events(live):
    from relay.serve.client import RelayClient

    def one(i):
        with RelayClient(live.target) as c:
            result = c.generate(_request(**dict(FAST, steps=2, seed=i)), timeout=600)
            return [e.progress.step for e in result.events if e.HasField("progress")], result.done.size

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert all(steps == [1, 2] and size > 0 for steps, size in results)
    assert live.wait_idle()


def test_token_auth_on_the_relay_service(tiny_models):
    from relay.serve.client import RelayClient

    server = LiveServer(tiny_models["t2v"], tokens=["s3cret"])
    try:
        with RelayClient(server.target) as anonymous, RelayClient(server.target, token="wrong") as wrong:
            for c in (anonymous, wrong):
                with pytest.raises(grpc.RpcError) as caught:
                    c.generate(_request(**FAST), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _health(server.target) == 1  # health is exempt
        with RelayClient(server.target, token="s3cret") as good:
            assert good.generate(_request(**FAST), timeout=60).done.size > 0
    finally:
        server.stop()


def _serve_process(tiny_models, tmp_path, *flags):
    from relay.cli.service import _wait_serving

    port_file = tmp_path / "port"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--model", str(tiny_models["t2v"]),
                             "--port", "0", "--port-file", str(port_file), "--dtype", "fp32",
                             "--device", "cpu", *flags],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, _wait_serving(proc, port_file, timeout_s=120), log


def _end_process(proc, log) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def test_sigterm_drains_while_a_job_runs(tiny_models, tmp_path):
    """SIGTERM while a job runs: health goes NOT_SERVING and new calls get UNAVAILABLE *during*
    the drain, the queued job is cancelled, the running one finishes, the process exits 0."""
    from relay.serve.client import RelayClient

    proc, port, log = _serve_process(tiny_models, tmp_path, "--grace", "120")
    target = f"127.0.0.1:{port}"
    try:
        with RelayClient(target) as c, RelayClient(target) as other:
            running, first = _stream_until(c, _request(**dict(FAST, steps=150)), "progress")
            queued, _ = _stream_until(other, _request(**FAST), "accepted")
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as caught:  # the queued job is cancelled by the drain
                list(queued)
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            assert "shutting down" in caught.value.details()
            assert _health(target) == 2  # NOT_SERVING while the running job finishes
            with pytest.raises(grpc.RpcError) as caught:
                other.generate(_request(**FAST), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in caught.value.details()
            assert proc.poll() is None  # still draining: the refusal came from the server, not a closed port
            events = list(running)  # the in-flight job runs to the end
            assert events[-1].HasField("done")
            assert [e.progress.step for e in events if e.HasField("progress")][-1] == 150
        assert proc.wait(timeout=60) == 0
    finally:
        _end_process(proc, log)
    text = (tmp_path / "serve.log").read_text()
    assert "draining: no new jobs" in text and "drained and stopped" in text


def test_grace_expiry_cancels_the_running_job_at_a_step_boundary(tiny_models, tmp_path):
    from relay.serve.client import RelayClient

    proc, port, log = _serve_process(tiny_models, tmp_path, "--grace", "1")
    try:
        with RelayClient(f"127.0.0.1:{port}") as c:
            running, first = _stream_until(c, _request(**LONG), "progress")
            proc.send_signal(signal.SIGTERM)
            steps = []
            with pytest.raises(grpc.RpcError) as caught:
                for event in running:
                    if event.HasField("progress"):
                        steps.append(event.progress.step)
            assert caught.value.code() == grpc.StatusCode.CANCELLED
            assert steps and steps[-1] < LONG["steps"]  # stopped before its last step
        assert proc.wait(timeout=60) == 0
    finally:
        _end_process(proc, log)


def test_generated_stubs_are_fresh():
    from relay.serve.codegen import stale_files

    assert stale_files() == []


def test_queued_jobs_receive_heartbeats(live, client):
    running, first = _stream_until(client, _request(**LONG), "progress")
    waiting = client.stub.Generate(_request(**FAST), timeout=120)
    queued = 0
    for event in waiting:
        if event.WhichOneof("event") == "queued":
            queued += 1
            if queued == 3:  # admission plus two heartbeats (heartbeat_s=0.2 on this server)
                break
    assert queued == 3
    waiting.cancel()
    client.cancel(first.job_id)
    with pytest.raises(grpc.RpcError):
        list(running)
    assert live.wait_idle()


def test_reflection_lists_the_services(tiny_models):
    """Reflection is opt-in (--reflection); with it, clients can discover the services."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from relay.engine.model_info import read_model_info
    from relay.engine.service import AsyncEngine
    from relay.serve.server import RelayServer, ServerConfig

    async def names():
        engine = AsyncEngine({}, default_model="x")
        relay = RelayServer(engine, {"x": read_model_info(tiny_models["t2v"])},
                            ServerConfig(host="127.0.0.1", port=0, reflection=True))
        await relay.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
                stub = reflection_pb2_grpc.ServerReflectionStub(channel)
                request = reflection_pb2.ServerReflectionRequest(list_services="")
                async for response in stub.ServerReflectionInfo(iter([request])):
                    return {s.name for s in response.list_services_response.service}
        finally:
            await relay.server.stop(0)

    found = asyncio.run(names())
    assert {"relay.v1.Relay", "grpc.health.v1.Health"} <= found


def test_relay_submit_cli(live, relay, tmp_path):
    out = tmp_path / "submitted.npy"
    args = ["submit", "--server", live.target, "--prompt", "a red kite over the sea", "--output", out,
            "--preview-every", "2", "--preview-dir", tmp_path / "previews", "--quiet"]
    for key, value in FAST.items():
        args += [f"--{key.replace('_', '-')}", value]
    result = relay(*args)
    assert result.code == 0, result.err
    assert result.err == "" and result.out == ""  # --quiet means nothing printed
    assert np.load(out).shape == (FAST["frames"], FAST["height"], FAST["width"], 3)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step-0002.png", "step-0004.png"]
    bad = relay("submit", "--server", live.target, "--prompt", "x", "--height", "30", "--output", out)
    assert bad.code == 2 and "INVALID_ARGUMENT: height:" in bad.err


def test_list_models_defaults_are_the_folders_without_placeholders(live, client):
    from relay.engine.model_info import read_model_info

    info = read_model_info(live.model_dir)
    (model,) = client.list_models().models
    d = model.defaults
    assert d.prompt == "" and d.seed == -1  # -1: random, as in GenerateRequest
    assert (d.height, d.width, d.frames, d.steps, d.fps) == (info.defaults.height, info.defaults.width,
                                                             info.defaults.frames, info.defaults.steps, info.defaults.fps)
    assert d.shift == pytest.approx(info.defaults.shift) and d.boundary == pytest.approx(info.boundary_ratio)
    assert d.solver == "unipc"  # the folder's UniPCMultistepScheduler


def test_one_log_line_per_request_admission_start_and_end_without_the_prompt(live, client, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="relay.engine.service")
    result = client.generate(_request(**FAST))
    job_id = result.events[0].job_id
    records = [r for r in caplog.records if job_id in r.getMessage()]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 3, lines
    assert "admitted: model" in lines[0]
    assert "started: model" in lines[1] and f"{FAST['steps']} steps" in lines[1] and "32x32" in lines[1]
    assert "succeeded after" in lines[2]
    assert all(r.request_id == job_id for r in records)  # the id logs join on (engine.logs)
    assert not any("kite" in line for line in lines)  # never the prompt


def test_grpc_seed_minus_one_is_random_like_the_cli(client, relay, tiny_models, tmp_path):
    settings = client.generate(_request(**dict(FAST, seed=-1))).settings
    assert 0 <= settings.seed < 2**63
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", "x", "--seed", "-1", "--steps", 2,
                   "--height", 32, "--width", 32, "--frames", 5, "--output", tmp_path / "x.npy")
    assert result.code == 0, result.err
    assert "seed          " in result.err and " random" in result.err


def test_a_video_larger_than_one_chunk_arrives_whole(client, tiny_models):
    """npy at 128x128x9 is 1.77 MB: two chunks of at most 1 MiB, in offset order, equal to the engine."""
    from relay.engine import Engine, GenerationRequest, load_model

    settings = dict(FAST, height=128, width=128, frames=9, steps=2)
    result = client.generate(_request(output_format=pb.OUTPUT_FORMAT_NPY, **settings))
    chunks = [e.video_chunk for e in result.events if e.HasField("video_chunk")]
    assert len(chunks) == 2 and all(len(c.data) <= 1 << 20 for c in chunks)
    assert [c.offset for c in chunks] == [0, len(chunks[0].data)]
    assert result.done.size == len(result.data) == sum(len(c.data) for c in chunks)
    import hashlib

    assert result.done.sha256 == hashlib.sha256(result.data).hexdigest()
    expected = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu")).generate(
        GenerationRequest(prompt="a red kite over the sea", **settings))
    assert np.abs(np.load(io.BytesIO(result.data)) - expected).max() <= 1e-5


# --- LoRAs by name in the server's LoRA directory --------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory):
    from relay.engine.models.wan.tiny import write_lora

    root = tmp_path_factory.mktemp("served-loras")
    write_lora(root / "style-a.safetensors", tiny_models["t2v"], expert="high_noise", layout="wan", rank=4,
               alpha=2.0, seed=5, bias=True)
    (root / "distill").mkdir()
    write_lora(root / "distill" / "style-b.safetensors", tiny_models["t2v"], expert="low_noise", rank=8, seed=6)
    (root / "broken.safetensors").write_bytes(b"\x00" * 64)
    outside = tmp_path_factory.mktemp("outside")
    write_lora(outside / "secret.safetensors", tiny_models["t2v"], rank=2, seed=7)
    (root / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    return root


@pytest.fixture(scope="module")
def staged_lora_server(tiny_models, lora_dir):
    server = LiveServer(tiny_models["t2v"], max_queue=8, heartbeat_s=0.2, lora_dir=str(lora_dir), staged=True)
    yield server
    server.stop()


LORA_SETS = {
    "a": [("style-a.safetensors", 0.9, "high_noise")],
    "b": [("distill/style-b.safetensors", 1.2, ""), ("style-a.safetensors", 0.4, "low_noise")],
    "none": [],
}


def _lora_request(seed, entries):
    request = _request(output_format=pb.OUTPUT_FORMAT_NPY, **{**FAST, "seed": seed})
    for name, scale, expert in entries:
        request.loras.add(name=name, scale=scale, expert=expert)
    return request


@pytest.fixture(scope="module")
def single_process_runs(tiny_models, lora_dir):
    """Each LoRA set's frames from one in-process engine (the independent reference)."""
    from relay.engine import Engine, GenerationRequest, load_model
    from relay.engine.lora import LoraRef

    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    settings = {k: v for k, v in FAST.items() if k != "seed"}
    runs = {}
    for key, entries in LORA_SETS.items():
        refs = tuple(LoraRef(path=str(lora_dir / name), scale=scale, expert=expert or None)
                     for name, scale, expert in entries)
        for seed in (31, 32):
            runs[key, seed] = engine.generate(GenerationRequest(
                prompt="a red kite over the sea", seed=seed, loras=refs, **settings))
    return runs


def test_served_lora_sets_in_turn_equal_their_single_process_runs(staged_lora_server, single_process_runs):
    from relay.serve.client import RelayClient

    with RelayClient(staged_lora_server.target) as client:
        for key in ("a", "b", "none", "a"):
            result = client.generate(_lora_request(31, LORA_SETS[key]))
            frames = np.load(io.BytesIO(result.data))
            assert np.abs(frames - single_process_runs[key, 31]).max() <= 1e-5, key
            settings = result.settings
            assert [(lora.name, lora.expert) for lora in settings.loras] == [
                (name, expert) for name, _, expert_given in LORA_SETS[key]
                for expert in ([expert_given] if expert_given else ["high_noise", "low_noise"])]
    assert np.abs(single_process_runs["a", 31] - single_process_runs["none", 31]).max() > 0.05


def test_interleaved_requests_keep_their_own_lora_sets_across_stage_groups(staged_lora_server, single_process_runs):
    """Two requests with different sets at once: the staged groups run one's low-noise steps
    while the other's high-noise steps run, and each group fuses each request's own set."""
    from relay.serve.client import RelayClient

    def one(job):
        key, seed = job
        with RelayClient(staged_lora_server.target) as client:
            return job, np.load(io.BytesIO(client.generate(_lora_request(seed, LORA_SETS[key])).data))

    jobs = [("a", 32), ("b", 32), ("none", 32), ("b", 31)]
    with ThreadPoolExecutor(4) as pool:
        for job, frames in pool.map(one, jobs):
            assert np.abs(frames - single_process_runs[job]).max() <= 1e-5, job


@pytest.mark.parametrize("name, words", [
    ("../outside/secret.safetensors", "outside the LoRA directory"),
    ("escape.safetensors", "outside the LoRA directory"),
    ("/etc/passwd", "not a path"),
    ("missing.safetensors", "no such LoRA"),
    ("broken.safetensors", "cannot be read as safetensors"),
    ("", "empty"),
])
def test_bad_lora_names_are_invalid_argument_before_any_worker_call(name, words, staged_lora_server):
    from relay.serve.client import RelayClient

    before = staged_lora_server.call(lambda: staged_lora_server.engine.worker_calls)
    with RelayClient(staged_lora_server.target) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(_lora_request(1, [(name, 1.0, "")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("lora:") and words in caught.value.details()
    assert staged_lora_server.call(lambda: staged_lora_server.engine.worker_calls) == before


def test_list_models_lists_the_lora_files(staged_lora_server, live):
    from relay.serve.client import RelayClient

    with RelayClient(staged_lora_server.target) as client:
        listed = client.list_models()
    names = [lora.name for lora in listed.loras]
    assert names == ["broken.safetensors", "distill/style-b.safetensors", "style-a.safetensors"]
    assert all(lora.size > 0 for lora in listed.loras)
    with RelayClient(live.target) as client:  # a server without --lora-dir lists none, refuses any
        assert not client.list_models().loras
        with pytest.raises(grpc.RpcError) as caught:
            client.generate(_lora_request(1, [("style-a.safetensors", 1.0, "")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--lora-dir" in caught.value.details()


def test_relay_submit_with_loras_and_the_lightning_preset(staged_lora_server, single_process_runs, relay, tmp_path):
    out = tmp_path / "submitted.npy"
    args = ["submit", "--server", staged_lora_server.target, "--prompt", "a red kite over the sea",
            "--output", out, "--quiet", "--lora-high", "style-a.safetensors:0.9"]
    for key, value in FAST.items():
        args += [f"--{key.replace('_', '-')}", 31 if key == "seed" else value]
    result = relay(*args)
    assert result.code == 0, result.err
    assert np.abs(np.load(out) - single_process_runs["a", 31]).max() <= 1e-5
    fast = relay("submit", "--server", staged_lora_server.target, "--prompt", "a kite", "--preset", "lightning",
                 "--height", "32", "--width", "32", "--frames", "5", "--output", tmp_path / "l.npy", "--quiet")
    assert fast.code == 0, fast.err
    bad = relay("submit", "--server", staged_lora_server.target, "--prompt", "x", "--timesteps", "900,1000",
                "--solver", "euler", "--output", out)
    assert bad.code == 2 and "INVALID_ARGUMENT: timesteps:" in bad.err


def test_served_cached_and_plain_requests_in_turn_equal_their_single_process_runs(staged_lora_server, tiny_models):
    """Feature caches on a staged server: a cached request, then an uncached one, then another
    cache, on the same two stage groups: each equals its single-process run (no cache state
    leaks from one request into the next), and the progress events count the skipped forwards."""
    from google.protobuf.json_format import MessageToDict

    from relay.engine import Engine, GenerationRequest, load_model
    from relay.serve.client import RelayClient

    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    settings = {k: v for k, v in FAST.items() if k != "seed"}
    caches = [dict(cache="fbc:0.1"), {}, dict(cache_high="taylorseer:interval=2,warmup=1", cache_low="fbc:0.1"), {}]
    with RelayClient(staged_lora_server.target) as client:
        for seed, fields in enumerate(caches, start=40):
            events = []
            reference = engine.generate(GenerationRequest(prompt="a red kite over the sea", seed=seed, **settings,
                                                          **fields), callback=events.append)
            result = client.generate(_request(output_format=pb.OUTPUT_FORMAT_NPY, **{**FAST, "seed": seed}, **fields))
            assert np.abs(np.load(io.BytesIO(result.data)) - reference).max() <= 1e-5, fields
            stats = MessageToDict(result.done.stats)
            skipped = sum(e.skipped for e in events)
            assert sum(e["skipped"] for e in stats["experts"].values()) == skipped
            assert sum(e.progress.skipped for e in result.events if e.HasField("progress")) == skipped
            assert (skipped > 0) == bool(fields), fields


# --- detached jobs ------------------------------------------------------------------------------
class _Clock:
    """A monotonic clock the test moves (results age without waiting)."""

    def __init__(self) -> None:
        self.now = time.monotonic()  # from the engine's own clock on: kept results stay in age order

    def __call__(self) -> float:
        return self.now


def _detached_request(seed):
    return _request(output_format=pb.OUTPUT_FORMAT_NPY, **{**FAST, "seed": seed})


def test_detached_job_outlives_its_client_and_is_fetched_later(live, tiny_models, relay, tmp_path):
    """Submit detached, drop the client, fetch from another: the frames equal the single-process
    run; a streamed (not detached) job's video is not kept; the CLI does the same."""
    from relay.engine import Engine, GenerationRequest, load_model
    from relay.serve.client import RelayClient

    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    settings = {k: v for k, v in FAST.items() if k != "seed"}
    with RelayClient(live.target) as first:
        job_id, accepted = first.submit_detached(_detached_request(61))
    assert accepted.settings.seed == 61
    with RelayClient(live.target) as second:
        assert second.get_job(job_id).detached
        result = second.fetch(job_id, timeout=120)
        job = second.get_job(job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.has_result and job.result_expires_in_s > 0
        again = second.fetch(job_id, timeout=30)  # kept until it expires, not consumed by a fetch
    reference = engine.generate(GenerationRequest(prompt="a red kite over the sea", seed=61, **settings))
    np.testing.assert_allclose(np.load(io.BytesIO(result.data)), reference, atol=1e-5, rtol=0)
    assert again.data == result.data and result.settings.seed == 61

    with RelayClient(live.target) as client:
        streamed = client.generate(_detached_request(62))
        with pytest.raises(grpc.RpcError) as caught:
            client.fetch(streamed.job_id, timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "delivered" in caught.value.details()
        assert not client.get_job(streamed.job_id).has_result

    # A streaming client of a detached job, SIGKILLed mid-run: the job finishes, the video waits.
    script = ("import sys; from relay.serve.client import RelayClient; from relay.serve.gen.relay.v1 import relay_pb2 as pb\n"
              "request = pb.GenerateRequest.FromString(bytes.fromhex(sys.argv[2]))\n"
              "with RelayClient(sys.argv[1]) as c:\n"
              "    for event in c.stub.Generate(request):\n"
              "        if event.WhichOneof('event') == 'progress':\n"
              "            print(event.job_id, flush=True)\n")
    request = _detached_request(61)
    request.detach = True
    killed = subprocess.Popen([sys.executable, "-c", script, live.target, request.SerializeToString().hex()],
                              stdout=subprocess.PIPE, text=True)
    try:
        killed_job = killed.stdout.readline().strip()  # the job is running: its first step is done
    finally:
        killed.kill()
        killed.wait()
    with RelayClient(live.target) as client:
        assert client.fetch(killed_job, timeout=120).data == result.data

    printed = relay("submit", "--server", live.target, "--prompt", "a red kite over the sea", "--seed", "61",
                    *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()], "--output", tmp_path / "x.npy",
                    "--detach", "--quiet")
    assert printed.code == 0, printed.err
    cli_job = printed.out.strip()
    fetched = relay("fetch", cli_job, "--server", live.target, "--output", tmp_path / "x.npy", "--quiet")
    assert fetched.code == 0, fetched.err
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.load(io.BytesIO(result.data)))
    wrong = relay("fetch", cli_job, "--server", live.target, "--output", tmp_path / "x.mp4", "--quiet")
    assert wrong.code == 2 and "--output" in wrong.err
    missing = relay("fetch", "nosuchjob", "--server", live.target, "--output", tmp_path / "y.npy")
    assert missing.code == 2 and "NOT_FOUND" in missing.err


def test_kept_results_expire_by_age_and_budget(live):
    """A kept video goes when it is older than the TTL or when newer ones exceed the budget;
    the job stays visible and says why, and the bytes are freed."""
    from relay.serve.client import RelayClient

    clock = _Clock()
    saved = live.call(lambda: (live.engine.clock, live.engine.result_ttl_s, live.engine.result_budget_bytes))

    def configure(ttl, budget):
        engine = live.engine
        engine.clock, engine.result_ttl_s, engine.result_budget_bytes = clock, ttl, budget

    live.call(lambda: configure(60.0, 10**9))
    try:
        with RelayClient(live.target) as client:
            old, _ = client.submit_detached(_detached_request(71))
            size = client.fetch(old, timeout=120).done.size
            # The submit's stream was cancelled by the client: a barrier until the server has seen
            # it go (a result is never dropped under an open stream).
            assert live.wait_idle()
            clock.now += 61
            assert not client.get_job(old).has_result and "expired" in client.get_job(old).result_note
            with pytest.raises(grpc.RpcError) as caught:
                client.fetch(old, timeout=30)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in caught.value.details()
            assert live.call(lambda: live.engine.kept_bytes) == 0

            live.call(lambda: configure(60.0, int(1.5 * size)))  # room for one result
            first, _ = client.submit_detached(_detached_request(72))
            client.fetch(first, timeout=120)
            assert live.wait_idle()
            second, _ = client.submit_detached(_detached_request(73))
            client.fetch(second, timeout=120)
            assert live.wait_idle()
            assert "budget" in client.get_job(first).result_note and client.get_job(second).has_result
            assert live.call(lambda: live.engine.kept_bytes) == size
    finally:
        def restore():
            engine = live.engine
            engine.clock, engine.result_ttl_s, engine.result_budget_bytes = saved

        live.call(restore)
