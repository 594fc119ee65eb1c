"""``relay bench serve``: the gRPC service end to end -- the real ``relay serve`` command in a
child process on 127.0.0.1 with a free port (its queue raised to admit every stream), driven from
this process by the real client (:class:`serve.client.RelayClient`) over a real channel.

Measured, on tiny requests (32x32 x 5 frames, ``.npy`` output, so that the figures are the
service's and not the model's):

* time to first event (``accepted``), to the first ``progress`` and to the end of one request at a
  time, over ``--rounds`` requests;
* events/s of one long stream with a ``progress`` event per step, and with a preview per step too,
  next to the server's own step rate (equal rates: the stream keeps up with the steps);
* ``--streams`` (default 50) concurrent ``Generate`` streams started together: wall time, time to
  first event and end-to-end p50/p95, and how many completed with a verified video.

The server has its own process (as in production) rather than a thread of this one: the client's
threads then do not compete with the server for the interpreter, and the synchronous client never
shares a process with the ``grpc.aio`` server (an in-process server once left a stream waiting
for its first event forever). Every call has a deadline (``--timeout``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relay.bench import common

SMALL = dict(height=32, width=32, frames=5, steps=4, seed=7, guidance=4.0, guidance_low=3.0)


def add_arguments(parser) -> None:
    """The serve bench's flags."""
    parser.add_argument("--model", help="diffusers Wan 2.2 directory (default: embedded tiny T2V)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--streams", type=int, default=50, help="concurrent Generate streams (default 50)")
    parser.add_argument("--stream-steps", type=int, help="steps of the events/s stream (default 100, smoke 20)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="deadline in seconds of the server start and of every call (default 300)")


def skip_reason(args) -> str | None:
    """Runs on every machine."""
    return None


class ServerProcess:
    """``relay serve`` in a child process on a free loopback port, SERVING once entered; leaving
    sends SIGTERM (a graceful drain) and waits for the exit.

    Args:
        model_dir: The served model.
        dtype, device: As for ``relay serve`` (``None``: its defaults).
        max_queue: Jobs that may wait behind the running one.
        timeout_s: How long the server may take to load and report SERVING.
    """

    def __init__(self, model_dir: str, *, dtype: str | None, device: str | None, max_queue: int,
                 timeout_s: float) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="relay-bench-serve-")
        self.port_file = Path(self.folder.name) / "port"
        self.log_path = Path(self.folder.name) / "serve.log"
        self.command = [sys.executable, "-m", "relay.cli", "serve", "--model", model_dir, "--host", "127.0.0.1",
                        "--port", "0", "--port-file", str(self.port_file), "--max-queue", str(max_queue)]
        self.command += ["--dtype", dtype] if dtype else []
        self.command += ["--device", device] if device else []
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.target = f"127.0.0.1:{self._wait_serving()}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.folder.cleanup()

    def _failed(self, why: str) -> RuntimeError:
        tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
        return RuntimeError(f"relay serve {why}; its log ends:\n" + "\n".join(tail))

    def _wait_serving(self) -> int:
        """The port, once health reports SERVING (a health watch, not a sleep on a guess)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + self.timeout_s
        while not (self.port_file.exists() and self.port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise self._failed(f"exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise self._failed("did not start listening")
            time.sleep(0.05)
        port = int(self.port_file.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=max(deadline - time.monotonic(), 1.0))
            try:
                for response in watch:
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        watch.cancel()
                        return port
            except grpc.RpcError as exc:
                raise self._failed(f"never became SERVING ({exc.code().name})") from None
        raise self._failed("closed its health stream")


def _request(**overrides):
    from relay.serve.gen.relay.v1 import relay_pb2 as pb

    fields = dict(SMALL, **overrides)
    return pb.GenerateRequest(prompt="a red kite over the sea", output_format=pb.OUTPUT_FORMAT_NPY, **fields)


def timed_generate(client, request, timeout_s: float) -> dict:
    """One generation; seconds from the call to the first event, the first progress and the end."""
    marks: dict = {"events": []}
    start = time.perf_counter()

    def on_event(event) -> None:
        now = time.perf_counter() - start
        kind = event.WhichOneof("event")
        marks["events"].append((now, kind))
        marks.setdefault("first_event_s", now)
        marks.setdefault("first_kind", kind)
        if kind == "progress":
            marks.setdefault("first_progress_s", now)

    result = client.generate(request, on_event=on_event, timeout=timeout_s, keep_events=False)
    marks["total_s"] = time.perf_counter() - start
    marks["denoise_s"] = result.done.timings.denoise_s
    return marks


def _single(client, n_rounds: int, timeout_s: float) -> dict:
    runs = [timed_generate(client, _request(), timeout_s) for _ in range(n_rounds)]
    return {"first_event_s": [r["first_event_s"] for r in runs], "first_kind": [r["first_kind"] for r in runs],
            "first_progress_s": [r["first_progress_s"] for r in runs], "total_s": [r["total_s"] for r in runs]}


def _stream(client, steps: int, preview_every: int, timeout_s: float) -> dict:
    marks = timed_generate(client, _request(steps=steps, preview_every=preview_every), timeout_s)
    times = [t for t, _ in marks["events"]]
    # Per-step events (progress, previews) between the first and the last of them: the rate the
    # stream delivers while the model steps, without the encode / decode at either end.
    per_step = [t for t, kind in marks["events"] if kind in ("progress", "preview")]
    return {"steps": steps, "preview_every": preview_every, "events": len(times),
            "step_events": len(per_step), "span_s": times[-1] - times[0],
            "events_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "step_events_per_s": (len(per_step) - 1) / (per_step[-1] - per_step[0]),
            "server_steps_per_s": steps / marks["denoise_s"]}


def _concurrent(client, streams: int, timeout_s: float) -> dict:
    import grpc

    barrier = threading.Barrier(streams + 1)

    def one(_):
        barrier.wait()
        try:
            marks = timed_generate(client, _request(), timeout_s)
            return {"ok": True, "first_event_s": marks["first_event_s"], "total_s": marks["total_s"]}
        except grpc.RpcError as exc:
            return {"ok": False, "error": f"{exc.code().name}: {exc.details()}"}

    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(one, index) for index in range(streams)]
        barrier.wait()
        start = time.perf_counter()
        results = [future.result() for future in futures]
        wall = time.perf_counter() - start
    return {"streams": streams, "wall_s": wall, "ok": sum(r["ok"] for r in results),
            "errors": [r["error"] for r in results if not r["ok"]],
            "first_event_s": [r["first_event_s"] for r in results if r["ok"]],
            "total_s": [r["total_s"] for r in results if r["ok"]]}


def run(args) -> common.BenchResult:
    """Starts the server, runs the three measurements, stops (drains) the server.

    Returns:
        Raw per-request timings and the summary (p50/p95, events/s, streams completed).
    """
    from relay.engine.loader import default_dtype
    from relay.engine.tiny import default_model_dir
    from relay.serve.client import RelayClient

    if args.streams < 1:
        raise common.SettingError(f"--streams must be at least 1, got {args.streams}")
    device = common.resolve_device(args.device)
    n_rounds = common.rounds(args, smoke=3, full=20)
    stream_steps = args.stream_steps or (20 if args.smoke else 100)
    if stream_steps < 2:
        raise common.SettingError(f"--stream-steps must be at least 2, got {stream_steps}")
    model = args.model or str(default_model_dir("t2v"))
    timeout = args.timeout
    with ServerProcess(model, dtype=args.dtype, device=args.device, max_queue=args.streams,
                       timeout_s=timeout) as server, RelayClient(server.target) as client:
        timed_generate(client, _request(), timeout)  # warm-up: channel, kernels, first decode
        raw = {"single": _single(client, n_rounds, timeout),
               "stream": [_stream(client, stream_steps, 0, timeout), _stream(client, stream_steps, 1, timeout)],
               "concurrent": _concurrent(client, args.streams, timeout)}
    settings = {"model": model, "device": str(device), "dtype": args.dtype or default_dtype(device),
                "request": dict(SMALL, output_format="npy"), "rounds": n_rounds, "stream_steps": stream_steps,
                "streams": args.streams, "smoke": bool(args.smoke),
                "transport": "plaintext 127.0.0.1, server in a child process"}
    summary = _summary(raw)
    return common.BenchResult(settings=settings, raw=raw, summary=summary, table=_table(settings, summary),
                              device=str(device))


def _summary(raw: dict) -> dict:
    single, concurrent = raw["single"], raw["concurrent"]
    p = common.percentile
    out: dict = {
        "first_event_p50_s": p(single["first_event_s"], 50), "first_event_p95_s": p(single["first_event_s"], 95),
        "first_event_kind": single["first_kind"][0],
        "first_progress_p50_s": p(single["first_progress_s"], 50),
        "single_total_p50_s": p(single["total_s"], 50),
        "stream_events_per_s": raw["stream"][0]["step_events_per_s"],
        "stream_server_steps_per_s": raw["stream"][0]["server_steps_per_s"],
        "stream_whole_events_per_s": raw["stream"][0]["events_per_s"],
        "stream_preview_events_per_s": raw["stream"][1]["step_events_per_s"],
        "stream_preview_server_steps_per_s": raw["stream"][1]["server_steps_per_s"],
        "concurrent_streams": concurrent["streams"], "concurrent_ok": concurrent["ok"],
        "concurrent_wall_s": concurrent["wall_s"]}
    if concurrent["ok"]:
        out.update(concurrent_first_event_p50_s=p(concurrent["first_event_s"], 50),
                   concurrent_first_event_p95_s=p(concurrent["first_event_s"], 95),
                   concurrent_total_p50_s=p(concurrent["total_s"], 50),
                   concurrent_total_p95_s=p(concurrent["total_s"], 95))
    return out


def _ms(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds * 1e3:.1f} ms"


def _table(settings: dict, s: dict) -> str:
    plain, preview = s["stream_events_per_s"], s["stream_preview_events_per_s"]
    n = s["concurrent_streams"]
    rows = [
        [f"first event ({s['first_event_kind']}), one request", _ms(s["first_event_p50_s"]),
         f"p95 {_ms(s['first_event_p95_s'])}, {settings['rounds']} requests"],
        ["first progress event, one request", _ms(s["first_progress_p50_s"]), "p50"],
        ["one request end to end", _ms(s["single_total_p50_s"]), "p50"],
        ["stream events/s, a progress event per step", f"{plain:.0f}",
         f"{settings['stream_steps']} steps; server {s['stream_server_steps_per_s']:.0f} steps/s"],
        ["stream events/s, progress + PNG preview per step", f"{preview:.0f}",
         f"server {s['stream_preview_server_steps_per_s']:.0f} steps/s"],
        ["stream events/s, whole stream (accepted..done)", f"{s['stream_whole_events_per_s']:.0f}",
         "includes encode and decode"],
        [f"{n} concurrent streams completed OK", f"{s['concurrent_ok']}/{n}", "video size + sha256 verified"],
        [f"{n} concurrent streams wall time", f"{s['concurrent_wall_s']:.2f} s",
         f"{s['concurrent_ok'] / s['concurrent_wall_s']:.1f} jobs/s"],
        [f"{n} concurrent: first event p50 / p95", _ms(s.get("concurrent_first_event_p50_s")),
         _ms(s.get("concurrent_first_event_p95_s"))],
        [f"{n} concurrent: end to end p50 / p95", _ms(s.get("concurrent_total_p50_s")),
         _ms(s.get("concurrent_total_p95_s"))],
    ]
    req = settings["request"]
    title = (f"serve: relay serve ({settings['transport']}) | {settings['model']} | "
             f"{settings['device']} {settings['dtype']} | requests {req['width']}x{req['height']}x{req['frames']}, "
             f"{req['steps']} steps, npy")
    return common.format_table(["measure", "value", "detail"], rows, title=title, align="lrl")
