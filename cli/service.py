"""``relay serve``, ``relay submit`` and ``relay demo`` (parsing lives in :mod:`cli.main`).

``relay serve`` runs each model on an executor of its own (any backend: this process, local
processes, torchrun, Ray), wrapped in a :class:`~engine.scheduled.ScheduledRunner` for the
async service engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from relay.cli.flags import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    attention_from_args,
    check_executor,
    check_placement_flags,
    layout_from_args,
    lora_refs,
    model_info,
    parse_device,
    parse_ray_resources,
    parse_timesteps,
    placement_from_args,
    refuse,
    resolve_device_type,
    scheduler_config,
)
from relay.engine.errors import ValidationError
from relay.engine.request import GenerationRequest, resolve_request


@dataclass(frozen=True, kw_only=True)
class ServeRun:
    """What :func:`serve_driver` needs (picklable: it travels in a torchrun job)."""

    models: list
    config: object
    max_queue: int
    heartbeat_s: float
    port_file: str | None
    plans: dict
    spec: object
    scheduler: object
    lora_dir: str | None = None
    result_ttl_s: float = 3600.0
    result_budget_bytes: int = 2 << 30
    http_port: int | None = None
    metrics_port: int | None = None
    log_prompts: bool = False


def serve(args: argparse.Namespace) -> int:
    """``relay serve``: every flag checked, then the models on the chosen executor, served."""
    from relay.engine.errors import ModelError
    from relay.serve.server import ServerConfig

    from relay.engine.logs import configure

    configure(args.log_format)
    try:
        tokens = _tokens(args)
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            raise ValidationError("tls_cert", "--tls-cert and --tls-key go together (and --tls-client-ca needs them)")
        check_port(args.host, args.port)
        device_type, device_index = parse_device(args.device)
        check_executor(args)
        config = ServerConfig(host=args.host, port=args.port, tokens=tokens, tls_cert=args.tls_cert,
                              tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                              reflection=args.reflection, grace_s=args.grace)
        scheduler = scheduler_config(args, max_queue=args.max_queue + 1)
        lora_dir = _lora_dir(args.lora_dir)
        if args.http_port is not None:
            if args.http_port != 0 and args.http_port == args.port:
                raise ValidationError("http_port", "must differ from --port")
            check_port(args.host, args.http_port, "http_port")
        if args.metrics_port is not None:
            if args.metrics_port != 0 and args.metrics_port in (args.port, args.http_port):
                raise ValidationError("metrics_port", "must differ from --port and --http-port")
            check_port(args.host, args.metrics_port, "metrics_port")
        if not args.result_ttl > 0:
            raise ValidationError("result_ttl", f"must be positive seconds, got {args.result_ttl}")
        if not args.result_budget > 0:
            raise ValidationError("result_budget", f"must be a positive number of GiB, got {args.result_budget}")
        models = args.model or [None]
        if args.executor == "torchrun" and len(models) > 1:
            raise ValidationError("executor", "torchrun serves one model (one group); use local or ray for more")
        infos = [model_info(directory) for directory in models]
        layouts = {}
        for info in infos:  # every flag first; the stage split below reads each model's scheduler
            layouts[str(info.path)] = layout = layout_from_args(args, info, needs_uncond=None)
            check_placement_flags(args, info, layout)
        plans = {}
        for info in infos:
            # Stage sizing uses the model's reference settings (a request may differ; the split stays).
            reference = resolve_request(GenerationRequest(prompt="reference", seed=0), info)
            plans[str(info.path)] = placement_from_args(args, info, reference, layouts[str(info.path)])
    except (ValidationError, ModelError) as exc:
        return refuse("serve", exc)
    from relay.launch.worker import WorkerSpec

    try:
        device_type = resolve_device_type(args.executor, device_type)
        attention = [attention_from_args(args, plans[str(info.path)], info, device_type, args.dtype)
                     for info in infos][0]  # one value, checked against every model's groups
    except ValidationError as exc:
        return refuse("serve", exc)
    spec = WorkerSpec(model="", layout=None, dtype=args.dtype, device_type=device_type,
                      text_encoder=args.text_encoder, offload=args.offload,
                      vae_parallel=args.vae_parallel, vae_tiling=args.vae_tiling, attention=attention)
    run = ServeRun(models=[str(info.path) for info in infos], config=config, max_queue=args.max_queue,
                   heartbeat_s=args.heartbeat, port_file=args.port_file, plans=plans, spec=spec,
                   scheduler=scheduler, lora_dir=lora_dir, result_ttl_s=args.result_ttl,
                   result_budget_bytes=int(args.result_budget * 2**30), http_port=args.http_port,
                   metrics_port=args.metrics_port, log_prompts=args.log_prompts)
    if args.executor == "torchrun":
        from relay.cli.generate import run_under_torchrun

        placement = plans[run.models[0]]
        job_spec = replace(spec, model=run.models[0], layout=placement.groups[0].layout)
        return run_under_torchrun(placement, job_spec, scheduler, "relay.cli.service:serve_driver", run)

    def build(info):
        from relay.launch.executor import Executor, backend_for

        placement = plans[str(info.path)]
        return Executor(placement, replace(spec, model=str(info.path), layout=placement.groups[0].layout),
                        backend=backend_for(args.executor, placement), config=scheduler,
                        ray_address=args.ray_address, ray_strategy=args.ray_strategy,
                        ray_resources=parse_ray_resources(args.ray_resources), device_offset=device_index)

    return _serve(run, build)


def _lora_dir(path: str | None) -> str | None:
    """``--lora-dir`` as an absolute path of a readable directory."""
    if path is None:
        return None
    from relay.engine.errors import ValidationError

    target = Path(path).resolve()
    if not target.is_dir() or not os.access(target, os.R_OK | os.X_OK):
        raise ValidationError("lora_dir", f"{path} is not a readable directory")
    return str(target)


def serve_driver(executor, run: ServeRun) -> int:
    """Rank 0 of ``relay serve --executor torchrun``: serves the one model on the torchrun group."""
    return _serve(run, lambda info: executor, close_executors=False)


def _serve(run: ServeRun, build, *, close_executors: bool = True) -> int:
    """Serves ``run.models``; ``build(info)`` gives each model's executor."""
    from relay.engine.loader import load_tokenizer
    from relay.engine.scheduled import ScheduledRunner
    from relay.serve.app import serve as serve_app

    def factory(info, name):
        placement = run.plans[str(info.path)]
        from relay.serve.app import say

        say(f"relay serve: {name}: {placement.kind} placement, {placement.reason}")
        executor = build(info)
        runner = ScheduledRunner(executor.scheduler, info, name=name, tokenizer=load_tokenizer(info))
        runner.close = executor.close if close_executors else executor.scheduler.close
        return runner

    from relay.engine.errors import ModelError
    from relay.engine.tickets import GroupFailure

    try:
        asyncio.run(serve_app(run.models, config=run.config, max_queue=run.max_queue, heartbeat_s=run.heartbeat_s,
                              port_file=run.port_file, runner_factory=factory, lora_dir=run.lora_dir,
                              result_ttl_s=run.result_ttl_s, result_budget_bytes=run.result_budget_bytes,
                              http_port=run.http_port, metrics_port=run.metrics_port,
                              log_prompts=run.log_prompts))
    except (ModelError, ValidationError) as exc:  # ValidationError: e.g. the Ray cluster lacks GPUs
        return refuse("serve", exc)
    except GroupFailure as exc:  # a group (or Ray itself) could not be built
        from relay.serve.app import say

        say(f"relay serve: error: {exc}", level=logging.ERROR)
        return EXIT_FAILED
    return EXIT_OK


def check_port(host: str, port: int, field: str = "port") -> None:
    """``--port`` (or ``field``): 0..65535, and free on ``host`` (checked here, so the error
    names the address instead of gRPC's 'Failed to bind'); 0 picks a free port."""
    import errno
    import socket

    from relay.engine.errors import ValidationError

    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValidationError(field, f"must be between 0 and 65535, got {port}")
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValidationError("host", f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            raise ValidationError(field, f"{host}:{port} is already in use" if taken
                                  else f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _tokens(args) -> list[str]:
    from relay.engine.errors import ValidationError

    if not args.token:
        return []
    from relay.serve.auth import load_tokens

    try:
        return load_tokens(args.token)
    except (OSError, ValueError) as exc:
        raise ValidationError("token", str(exc)) from None


def _request(args) -> "object":
    from relay.serve.gen.relay.v1 import relay_pb2 as pb

    message = pb.GenerateRequest(prompt=args.prompt, negative_prompt=args.negative_prompt,
                                 model=args.model, preview_every=args.preview_every, priority=args.priority,
                                 output_format=pb.OUTPUT_FORMAT_NPY if args.output.endswith(".npy")
                                 else pb.OUTPUT_FORMAT_MP4)
    for name in ("height", "width", "frames", "steps", "seed", "guidance", "guidance_low", "shift",
                 "boundary", "fps"):
        value = getattr(args, name)
        if value is not None:
            setattr(message, name, value)
    if args.image:
        message.image = Path(args.image).read_bytes()
    for name in ("solver", "preset", "cache", "cache_high", "cache_low", "guidance_terms"):
        if getattr(args, name):
            setattr(message, name, getattr(args, name))
    message.timesteps.extend(parse_timesteps(args.timesteps) or ())
    for ref in lora_refs(args):  # names in the server's --lora-dir; the server checks them
        lora = message.loras.add(name=ref.path, scale=ref.scale)
        if ref.expert:
            lora.expert = ref.expert
    return message


def submit(args: argparse.Namespace) -> int:
    """``relay submit``: stream a generation from a server into a file."""
    import grpc

    from relay.serve.client import RelayClient

    if not args.output.endswith((".mp4", ".npy")):
        print("relay submit: error: --output: must end in .mp4 or .npy", file=sys.stderr)
        return EXIT_USAGE
    try:
        request = _request(args)
    except OSError as exc:
        print(f"relay submit: error: --image: cannot read {args.image}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as exc:
        return refuse("submit", exc)
    if args.detach:
        for flag in ("stats", "preview_dir"):
            if getattr(args, flag):
                return refuse("submit", ValidationError(flag, "is for a streamed job; with --detach, relay fetch "
                                                              "saves the video (the stats are in GetJob's settings)"))
        return _submit_detached(args, request)
    previews = Path(args.preview_dir) if args.preview_dir else None
    progress = _StreamProgress(enabled=not args.quiet, previews=previews)
    with RelayClient(args.server, token=args.token, ca_file=args.tls_ca, cert_file=args.tls_cert,
                     key_file=args.tls_key) as client:
        try:
            result = client.generate(request, on_event=progress, timeout=args.timeout, keep_events=False)
        except grpc.RpcError as exc:
            progress.close()
            code = exc.code()
            print(f"relay submit: error: {code.name}: {exc.details()}", file=sys.stderr)
            return EXIT_USAGE if code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    progress.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.data)
    sound = _write_sound(out, result)
    if args.stats:
        from google.protobuf.json_format import MessageToDict

        Path(args.stats).parent.mkdir(parents=True, exist_ok=True)
        Path(args.stats).write_text(json.dumps(MessageToDict(result.done.stats), indent=2) + "\n")
    t = result.done.timings
    if not args.quiet:
        print(f"wrote {out}{sound} ({result.done.size} bytes, sha256 {result.done.sha256[:16]}...; seed "
              f"{result.settings.seed}; queued {t.queued_s:.1f}s, denoise {t.denoise_s:.1f}s, "
              f"decode {t.decode_s:.1f}s)", file=sys.stderr)
    return EXIT_OK


def _submit_detached(args, request) -> int:
    """``relay submit --detach``: the job id on stdout once accepted."""
    import grpc

    from relay.serve.client import RelayClient

    with RelayClient(args.server, token=args.token, ca_file=args.tls_ca, cert_file=args.tls_cert,
                     key_file=args.tls_key) as client:
        try:
            job_id, accepted = client.submit_detached(request, timeout=args.timeout or 60.0)
        except grpc.RpcError as exc:
            print(f"relay submit: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_USAGE if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILED
    print(job_id)
    if not args.quiet:
        print(f"relay submit: job {job_id} accepted (seed {accepted.settings.seed}); "
              f"relay fetch {job_id} --server {args.server} --output {args.output}", file=sys.stderr)
    return EXIT_OK


def fetch(args: argparse.Namespace) -> int:
    """``relay fetch JOB``: waits for a detached job and saves its video."""
    import grpc

    from relay.serve.client import RelayClient

    if not args.output.endswith((".mp4", ".npy")):
        print("relay fetch: error: --output: must end in .mp4 or .npy", file=sys.stderr)
        return EXIT_USAGE
    with RelayClient(args.server, token=args.token, ca_file=args.tls_ca, cert_file=args.tls_cert,
                     key_file=args.tls_key) as client:
        try:
            result = client.fetch(args.job_id, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"relay fetch: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return EXIT_USAGE if exc.code() == grpc.StatusCode.NOT_FOUND else EXIT_FAILED
    wanted = "application/x-npy" if args.output.endswith(".npy") else "video/mp4"
    if result.done.mime != wanted:
        print(f"relay fetch: error: --output: the job made {result.done.mime}, not {wanted}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(result.data)
    sound = _write_sound(out, result)
    if not args.quiet:
        print(f"wrote {out}{sound} ({result.done.size} bytes, sha256 {result.done.sha256[:16]}...)", file=sys.stderr)
    return EXIT_OK


def _write_sound(out: Path, result) -> str:
    """Writes an npy job's sound as ``.wav`` beside ``out``; `` and X.wav`` for the message."""
    if not result.done.audio_wav:
        return ""
    path = out.with_suffix(".wav")
    path.write_bytes(result.done.audio_wav)
    return f" and {path}"


class _StreamProgress:
    """Live progress bar for streamed events (step, expert, ETA) and preview saving."""

    def __init__(self, *, enabled: bool, previews: Path | None) -> None:
        self.enabled = enabled
        self.previews = previews
        self.bar = None

    def __call__(self, event) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued" and self.enabled and self.bar is None:
            print(f"queued: position {event.queued.position}", file=sys.stderr, flush=True)
        elif kind == "progress":
            if self.bar is None:
                from tqdm.auto import tqdm

                from relay.cli.progress import on_terminal

                self.bar = tqdm(total=event.progress.total, unit="step", desc="denoise", file=sys.stderr,
                                disable=not on_terminal(self.enabled), dynamic_ncols=True)
            self.bar.set_postfix_str(f"{event.progress.expert} eta {event.progress.eta_s:.1f}s", refresh=False)
            self.bar.update(event.progress.step - self.bar.n)
        elif kind == "preview" and self.previews is not None:
            self.previews.mkdir(parents=True, exist_ok=True)
            (self.previews / f"step-{event.preview.step:04d}.png").write_bytes(event.preview.png)
        elif kind == "decoding":
            self.close()
            if self.enabled:
                print("decoding...", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def demo(args: argparse.Namespace) -> int:
    """``relay demo``: the main job end to end on the embedded tiny model."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--port", "0",
                                   "--port-file", str(port_file)], start_new_session=True)
        try:
            port = _wait_serving(server, port_file)
            print(f"relay demo: server ready on 127.0.0.1:{port}; submitting", file=sys.stderr, flush=True)
            from relay.cli.main import main

            code = main(["submit", "--server", f"127.0.0.1:{port}", "--prompt", args.prompt,
                         "--seed", str(args.seed), "--preview-every", "2",
                         "--preview-dir", str(Path(args.output).with_suffix("")) + "-previews",
                         "--output", args.output])
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)  # graceful drain
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
    return code


def _wait_serving(server: subprocess.Popen, port_file: Path, timeout_s: float = 300.0, *,
                  credentials=None, host: str = "localhost") -> int:
    """Waits (health checks, not sleeps on a guess) until the server reports SERVING.

    ``credentials``: the ``grpc.ChannelCredentials`` of a TLS server (``host`` must match its
    certificate); plaintext otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while not port_file.exists() or not port_file.read_text().strip():
        if server.poll() is not None:
            raise RuntimeError(f"relay serve exited with code {server.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("relay serve did not start listening")
        time.sleep(0.1)
    port = int(port_file.read_text())
    channel = (grpc.secure_channel(f"{host}:{port}", credentials) if credentials is not None
               else grpc.insecure_channel(f"127.0.0.1:{port}"))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # Watch streams status changes: the first SERVING message is the moment to submit.
        for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s):
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return port
    raise RuntimeError("relay serve never became SERVING")
