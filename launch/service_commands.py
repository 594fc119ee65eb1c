"""``relay serve``, ``relay submit`` and ``relay demo`` (parsing lives in :mod:`launch.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def serve(args: argparse.Namespace) -> int:
    """``relay serve``."""
    from relay.engine.errors import ModelError, ValidationError
    from relay.engine.tiny import default_model_dir
    from relay.serve.app import serve as run
    from relay.serve.server import ServerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokens = []
    if args.token:
        from relay.serve.auth import load_tokens

        try:
            tokens = load_tokens(args.token)
        except (OSError, ValueError) as exc:
            print(f"relay serve: error: --token: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
        print("relay serve: error: --tls-cert and --tls-key go together (and --tls-client-ca needs them)",
              file=sys.stderr)
        return EXIT_USAGE
    config = ServerConfig(host=args.host, port=args.port, tokens=tokens, tls_cert=args.tls_cert,
                          tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                          reflection=args.reflection, grace_s=args.grace)
    models = args.model or [str(default_model_dir("t2v"))]
    factory = None
    try:
        if args.executor == "ray":
            from relay.launch.ray_commands import serve_runner_factory

            factory = serve_runner_factory(args, models)
        elif args.placement != "fused" or args.replicas != 1 or args.stage_split or args.ray_address:
            raise ValidationError("executor", "--placement / --replicas / --stage-split / --ray-address "
                                              "need --executor ray")
        asyncio.run(run(models, config=config, dtype=args.dtype, device=args.device, offload=args.offload,
                        max_queue=args.max_queue, heartbeat_s=args.heartbeat, port_file=args.port_file,
                        runner_factory=factory))
    except ValidationError as exc:
        print(f"relay serve: error: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except ModelError as exc:
        print(f"relay serve: error: --model: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if factory is not None:
            from relay.launch.ray_executor import shutdown

            shutdown()
    return EXIT_OK


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
    t = result.done.timings
    print(f"wrote {out} ({result.done.size} bytes, sha256 {result.done.sha256[:16]}...; seed "
          f"{result.settings.seed}; queued {t.queued_s:.1f}s, denoise {t.denoise_s:.1f}s, "
          f"decode {t.decode_s:.1f}s)", file=sys.stderr)
    return EXIT_OK


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

                self.bar = tqdm(total=event.progress.total, unit="step", desc="denoise", file=sys.stderr,
                                disable=not self.enabled, dynamic_ncols=True)
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
        server = subprocess.Popen([sys.executable, "-m", "relay.launch.cli", "serve", "--port", "0",
                                   "--port-file", str(port_file)], start_new_session=True)
        try:
            port = _wait_serving(server, port_file)
            print(f"relay demo: server ready on 127.0.0.1:{port}; submitting", file=sys.stderr, flush=True)
            from relay.launch.cli import main

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


def _wait_serving(server: subprocess.Popen, port_file: Path, timeout_s: float = 300.0) -> int:
    """Waits (health checks, not sleeps on a guess) until the server reports SERVING."""
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
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # Watch streams status changes: the first SERVING message is the moment to submit.
        for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s):
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return port
    raise RuntimeError("relay serve never became SERVING")
