"""The ``relay`` command line: ``generate``, ``resume``, ``serve``, ``submit``, ``demo``,
``make-tiny``, ``plan``, ``simulate`` and ``bench``.

The CLI is thin: it parses flags into a :class:`engine.request.GenerationRequest`, validates
every flag against the model's configs before torch, diffusers or Ray is imported (exit code 2
naming the flag), then hands the request to an executor (:mod:`launch.executor`). Building the
parser imports nothing heavy, so ``relay --help`` answers at once. See ``relay <command> --help``.
"""

from __future__ import annotations

import argparse
import sys

from relay.cli.flags import (
    checkpoint_flags,
    executor_flags,
    generation_flags,
    parallel_flags,
    runtime_flags,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``relay`` command."""
    from relay import __version__

    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay: distributed inference for the Wan 2.2 and LTX-2 video diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser(
        "generate", help="generate one video",
        description="Generate one video, in this process, on local processes, under torchrun or on "
                    "Ray. Every setting is checked before any library or weight loads; a bad one "
                    "exits with code 2 naming it.")
    generation_flags(gen)
    runtime_flags(gen)
    parallel_flags(gen)
    executor_flags(gen)
    checkpoint_flags(gen)
    gen.set_defaults(handler="relay.cli.generate:generate")
    res = sub.add_parser("resume", help="finish a generation from a denoise-state snapshot",
                         description="Continue a snapshot written by `generate --checkpoint-dir` "
                                     "(bit-identical to an uninterrupted run on the same device), "
                                     "on any executor.")
    res.add_argument("state", help="snapshot file (.pt)")
    runtime_flags(res)
    parallel_flags(res)
    executor_flags(res)
    res.set_defaults(handler="relay.cli.generate:resume")
    srv = sub.add_parser("serve", help="serve generations over gRPC (relay.v1.Relay)",
                         description="Serve Wan 2.2 generations over gRPC with streamed progress, on "
                                     "any executor. SIGTERM drains: no new jobs, in-flight jobs "
                                     "finish within --grace.")
    srv.add_argument("--model", action="append",
                     help="model directory (repeatable; default: the embedded tiny T2V model)")
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=50051, help="listen port; 0 picks a free one")
    srv.add_argument("--port-file", help="write the bound port here once listening")
    srv.add_argument("--http-port", type=int, metavar="PORT",
                     help="also serve the HTTP videos API (/v1/videos, OpenAPI at /openapi.json) and the web page "
                          "at / on this port (0: a free one), with the same tokens and TLS")
    srv.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text lines, or one JSON object per line with the request id on every line about a "
                          "request (workers too)")
    srv.add_argument("--log-prompts", action="store_true",
                     help="log each job's prompts in its admission line (never logged otherwise; tokens never are)")
    srv.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics at /metrics on this port (0: a free one): requests, queue "
                          "depth, step and request seconds, group busy time and restarts, forwards, hand-off bytes, "
                          "the gRPC and HTTP calls")
    srv.add_argument("--max-queue", type=int, default=8, help="jobs that may wait behind the running ones")
    srv.add_argument("--lora-dir", metavar="DIR",
                     help="LoRA files requests may name (by file name inside DIR); ListModels lists them")
    srv.add_argument("--result-ttl", type=float, default=3600.0, metavar="SECONDS",
                     help="how long a detached job's video is kept for relay fetch / GetResult (default 3600)")
    srv.add_argument("--result-budget", type=float, default=2.0, metavar="GIB",
                     help="the most GiB of detached jobs' videos kept at once; the oldest go first (default 2)")
    srv.add_argument("--heartbeat", type=float, default=5.0, help="seconds between queued heartbeats")
    srv.add_argument("--grace", type=float, default=60.0, help="seconds in-flight jobs get on SIGTERM")
    srv.add_argument("--token", help="require bearer tokens: comma-separated, or @FILE (one per line)")
    srv.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    srv.add_argument("--tls-key", help="server private key (PEM)")
    srv.add_argument("--tls-client-ca", help="require client certificates from this CA (mutual TLS)")
    srv.add_argument("--reflection", action="store_true", help="serve gRPC reflection")
    runtime_flags(srv, output=False, model=False)
    parallel_flags(srv)
    executor_flags(srv)
    srv.set_defaults(handler="relay.cli.service:serve")
    sub_ = sub.add_parser("submit", help="submit a generation to a relay server and stream it",
                          description="Submit a generation to `relay serve`, show streamed progress, "
                                      "save the video. Bad input exits 2 with the server's message.")
    generation_flags(sub_, submit=True)
    sub_.add_argument("--server", default="127.0.0.1:50051", help="host:port of relay serve")
    sub_.add_argument("--model", default="", help="served model name (default: the server's default)")
    sub_.add_argument("--output", required=True, help=".mp4 or .npy (the raw frames, as relay generate)")
    sub_.add_argument("--preview-dir", help="save streamed preview PNGs here")
    sub_.add_argument("--preview-every", type=int, default=0, help="a preview every N steps")
    sub_.add_argument("--priority", type=int, default=0, help="higher runs first")
    sub_.add_argument("--token", help="bearer token")
    sub_.add_argument("--tls-ca", help="CA certificate to verify the server (enables TLS)")
    sub_.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    sub_.add_argument("--tls-key", help="client key (mutual TLS)")
    sub_.add_argument("--timeout", type=float, help="deadline in seconds")
    sub_.add_argument("--stats", metavar="PATH.json", help="write the server's run stats of this job here")
    sub_.add_argument("--quiet", action="store_true", help="no progress output")
    sub_.add_argument("--detach", action="store_true",
                      help="submit detached: print the job id once accepted and exit; the job runs on and "
                           "`relay fetch JOB` saves its video later (--output is then where fetch will write)")
    sub_.set_defaults(handler="relay.cli.service:submit")
    fetch = sub.add_parser("fetch", help="save the video of a detached job (waits for it to finish)",
                           description="Fetch the finished video of a job submitted with `relay submit "
                                       "--detach`, waiting for it to end; the server keeps results for "
                                       "its --result-ttl within its --result-budget.")
    fetch.add_argument("job_id", help="the job id relay submit --detach printed")
    fetch.add_argument("--server", default="127.0.0.1:50051", help="host:port of relay serve")
    fetch.add_argument("--output", required=True, help=".mp4 or .npy (the format the job was submitted with)")
    fetch.add_argument("--token", help="bearer token")
    fetch.add_argument("--tls-ca", help="CA certificate to verify the server (enables TLS)")
    fetch.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    fetch.add_argument("--tls-key", help="client key (mutual TLS)")
    fetch.add_argument("--timeout", type=float, help="deadline in seconds (default: wait as long as it runs)")
    fetch.add_argument("--quiet", action="store_true", help="no messages")
    fetch.set_defaults(handler="relay.cli.service:fetch")
    demo = sub.add_parser("demo", help="start a server on the tiny model, submit, save the video",
                          description="The main job end to end: relay serve on the embedded tiny "
                                      "model, relay submit with streamed progress, graceful stop.")
    demo.add_argument("--prompt", default="a red robot walking through a neon city at night, cinematic")
    demo.add_argument("--output", default="out/demo.mp4")
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(handler="relay.cli.service:demo")
    tiny = sub.add_parser("make-tiny", help="write a tiny random Wan 2.2 or LTX-2 model (diffusers layout)",
                          description="Write a random tiny Wan 2.2 or LTX-2 model for tests and demos.")
    tiny.add_argument("directory", help="target folder")
    tiny.add_argument("--kind", choices=("t2v", "i2v", "ti2v", "ltx2"), default="t2v",
                      help="t2v / i2v: Wan 2.2 with two experts (MoE); ti2v: Wan 2.2 dense, 48-channel VAE; "
                           "ltx2: LTX-2 (video and sound, text and an optional first image)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(handler="relay.cli.generate:make_tiny")
    from relay.cli import bench, plan, simulate

    plan.add_parser(sub)
    simulate.add_parser(sub)
    bench.add_parser(sub)
    return parser


# Top-level modules of the [engine] extra: a command that imports one of them on a client-only
# install gets a plain line naming the install, not a traceback.
ENGINE_MODULES = frozenset({"torch", "diffusers", "transformers", "accelerate", "xfuser", "yunchang", "ray",
                            "fastapi", "uvicorn", "starlette", "pydantic", "imageio", "imageio_ffmpeg",
                            "av", "einops", "numpy", "PIL", "safetensors", "grpc_tools", "grpc_reflection",
                            "sentencepiece", "ftfy"})


def _handler(args):
    """The sub-command's function: a ``"module:function"`` name, imported only now."""
    import importlib

    handler = args.handler
    if callable(handler):
        return handler
    module, _, name = handler.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relay`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _handler(args)(args)
    except KeyboardInterrupt:
        print(f"relay {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one plain line; RELAY_DEBUG=1 shows the traceback
        import os

        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in ENGINE_MODULES:
            # A studio machine's client install (wan-relay[client]) has the CLI but not the engine.
            print(f"relay {args.command}: needs the engine install, which this environment lacks (no module "
                  f"{exc.name!r}): pip install 'wan-relay[engine]'; submit and fetch work without it",
                  file=sys.stderr)
            return 1

        if os.environ.get("RELAY_DEBUG"):
            raise
        print(f"relay {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(set RELAY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
