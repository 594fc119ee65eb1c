"""The ``relay`` command line: ``generate``, ``resume``, ``serve``, ``submit``, ``demo`` and
``make-tiny``.

The CLI is thin: it parses flags into a :class:`engine.request.GenerationRequest`, validates it
against the model's configs before loading any weights (exit code 2 naming the field), then
hands it to the engine. See ``relay <command> --help``.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation settings (unset: the model kind's reference value)")
    g.add_argument("--prompt", required=True, help="what the video shows (at most 512 tokens)")
    g.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    g.add_argument("--height", type=int, help="pixels; a multiple of 16 (32 for TI2V-5B)")
    g.add_argument("--width", type=int, help="pixels; a multiple of 16 (32 for TI2V-5B)")
    g.add_argument("--frames", type=int, help="frame count, 4k+1 (81 for A14B, 121 for TI2V-5B)")
    g.add_argument("--steps", type=int, help="denoising steps, 1..1000 (40 for A14B, 50 for TI2V-5B)")
    g.add_argument("--seed", type=int, help="0..2^63-1; random when unset (the seed used is printed)")
    g.add_argument("--guidance", type=float,
                   help="classifier-free guidance of the high-noise expert (or the only one); 1 = off")
    g.add_argument("--guidance-low", type=float, help="guidance of the low-noise expert (MoE models)")
    g.add_argument("--shift", type=float, help="flow-matching sigma shift (T2V-A14B: 12, others: 5)")
    g.add_argument("--boundary", type=float,
                   help="fraction of the noise range where the low-noise expert takes over (MoE models)")
    g.add_argument("--fps", type=int, help="frames per second of the mp4 (16 for A14B, 24 for TI2V-5B)")
    g.add_argument("--image", help="first frame for image-to-video (PNG/JPEG/WebP)")


def _runtime_flags(parser: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    r = parser.add_argument_group("model and runtime")
    r.add_argument("--model", required=model_required,
                   help="diffusers-format Wan 2.2 directory or cached hub id "
                        "(default: the embedded tiny T2V model)")
    r.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="transformer/text-encoder dtype (default: bf16 on CUDA, fp32 on CPU)")
    r.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: cuda if present)")
    r.add_argument("--offload", action="store_true",
                   help="one device: keep the text encoder and experts in CPU memory, moving each "
                        "to the GPU only while it runs; a group with --fsdp: keep the FSDP shards "
                        "in CPU memory between uses (FSDP2 CPU offload)")
    r.add_argument("--output", required=True, help="output file: .mp4 (H.264) or .npy (float32 frames)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")


def _executor_flags(parser: argparse.ArgumentParser, *, serve: bool = False) -> None:
    e = parser.add_argument_group(
        "executor and placement (--executor ray: worker groups of Ray actors, one per device)")
    if serve:
        e.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local: the model in this process; ray: worker groups of Ray actors "
                            "under the stage scheduler (default local)")
        e.add_argument("--nproc", type=int, default=1,
                       help="ray, staged: devices to split between the stages (default 2)")
        e.add_argument("--layout", metavar="SPEC",
                       help='ray, fused: layout of each replica group, e.g. "ulysses=2,fsdp=2"')
    else:
        e.add_argument("--executor", choices=("local", "torchrun", "ray"), default="local",
                       help="local: this process, or --nproc spawned processes; torchrun: under "
                            "torchrun; ray: Ray actors in placement groups (default local)")
    e.add_argument("--placement", choices=("fused", "staged"), default="fused",
                   help="fused: each group holds both experts; staged: the high-noise and the "
                        "low-noise expert on separate groups, the state handed over at the boundary")
    e.add_argument("--replicas", type=int, default=1, help="fused: identical groups (data parallel)")
    e.add_argument("--stage-split", metavar="HIGH:LOW",
                   help="staged: devices per expert group (default: balanced to the step counts)")
    e.add_argument("--high-layout", metavar="SPEC", help='staged: layout of the high-noise group, e.g. "ulysses=4,fsdp=4"')
    e.add_argument("--low-layout", metavar="SPEC", help="staged: layout of the low-noise group")
    e.add_argument("--encode-on", choices=("high", "low", "own"), default="high",
                   help="staged: group that encodes text/image (own: a device of its own)")
    e.add_argument("--decode-on", choices=("high", "low", "own"), default="low",
                   help="staged: group that VAE-decodes (own: a device of its own)")
    e.add_argument("--ray-address", help="existing Ray cluster (default: start a local Ray)")
    e.add_argument("--ray-strategy", choices=("STRICT_PACK", "PACK", "SPREAD"), default="STRICT_PACK",
                   help="placement-group strategy: STRICT_PACK keeps a group on one node")
    e.add_argument("--checkpoint-every", type=int, default=1,
                   help="ray: steps between the scheduler's in-memory checkpoints (default 1)")
    e.add_argument("--step-timeout", type=float, default=300.0,
                   help="ray: watchdog seconds per step before a group is declared hung")
    e.add_argument("--max-retries", type=int, default=2,
                   help="ray: group failures one request may survive (default 2)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``relay`` command."""
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay: distributed inference for the Wan 2.2 video diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser(
        "generate", help="generate one video on this machine",
        description="Generate one video. Every setting is checked before weights load; "
                    "a bad one exits with code 2 naming it.")
    _generation_flags(gen)
    _runtime_flags(gen)
    p = gen.add_argument_group(
        "parallel execution (one video on N processes: NCCL on CUDA, gloo on CPU)")
    p.add_argument("--nproc", type=int, default=1, help="processes / GPUs in the group (default 1)")
    p.add_argument("--ulysses", type=int,
                   help="Ulysses sequence-parallel degree; must divide the heads (40 A14B, 24 5B)")
    p.add_argument("--ring", type=int, help="ring-attention sequence-parallel degree")
    p.add_argument("--cfg-parallel", type=int, choices=(1, 2),
                   help="2: conditional and unconditional forwards on two halves of the group")
    p.add_argument("--fsdp", type=int, nargs="?", const=-1,
                   help="shard each expert with FSDP2: alone = over the sequence-parallel ranks, "
                        "or a degree (the sequence-parallel degree or nproc)")
    p.add_argument("--text-encoder", choices=("device", "cpu", "fsdp"), default="device",
                   help="text encoder placement in a group: a copy per device, on the host CPU, "
                        "or sharded over all ranks")
    _executor_flags(gen)
    c = gen.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", help="write denoise-state snapshots into this folder")
    c.add_argument("--checkpoint-at", default="",
                   help="comma-separated step counts after which to snapshot (e.g. 5,20)")
    res = sub.add_parser("resume", help="finish a generation from a denoise-state snapshot",
                         description="Continue a snapshot written by `generate --checkpoint-dir` "
                                     "(bit-identical to an uninterrupted run on the same device).")
    res.add_argument("state", help="snapshot file (.pt)")
    _runtime_flags(res)
    srv = sub.add_parser("serve", help="serve generations over gRPC (relay.v1.Relay)",
                         description="Serve Wan 2.2 generations over gRPC with streamed progress. "
                                     "SIGTERM drains: no new jobs, in-flight jobs finish within --grace.")
    srv.add_argument("--model", action="append",
                     help="model directory (repeatable; default: the embedded tiny T2V model)")
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=50051, help="listen port; 0 picks a free one")
    srv.add_argument("--port-file", help="write the bound port here once listening")
    srv.add_argument("--max-queue", type=int, default=8, help="jobs that may wait behind the running one")
    srv.add_argument("--heartbeat", type=float, default=5.0, help="seconds between queued heartbeats")
    srv.add_argument("--grace", type=float, default=60.0, help="seconds in-flight jobs get on SIGTERM")
    srv.add_argument("--token", help="require bearer tokens: comma-separated, or @FILE (one per line)")
    srv.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    srv.add_argument("--tls-key", help="server private key (PEM)")
    srv.add_argument("--tls-client-ca", help="require client certificates from this CA (mutual TLS)")
    srv.add_argument("--reflection", action="store_true", help="serve gRPC reflection")
    srv.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="as for generate")
    srv.add_argument("--device", help="as for generate")
    srv.add_argument("--offload", action="store_true", help="as for generate")
    _executor_flags(srv, serve=True)
    sub_ = sub.add_parser("submit", help="submit a generation to a relay server and stream it",
                          description="Submit a generation to `relay serve`, show streamed progress, "
                                      "save the video. Bad input exits 2 with the server's message.")
    _generation_flags(sub_)
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
    sub_.add_argument("--quiet", action="store_true", help="no progress bar")
    demo = sub.add_parser("demo", help="start a server on the tiny model, submit, save the video",
                          description="The main job end to end: relay serve on the embedded tiny "
                                      "model, relay submit with streamed progress, graceful stop.")
    demo.add_argument("--prompt", default="a red robot walking through a neon city at night, cinematic")
    demo.add_argument("--output", default="out/demo.mp4")
    demo.add_argument("--seed", type=int, default=42)
    tiny = sub.add_parser("make-tiny", help="write a tiny random Wan 2.2 model (diffusers layout)",
                          description="Write a random tiny Wan 2.2 model for tests and demos.")
    tiny.add_argument("directory", help="target folder")
    tiny.add_argument("--kind", choices=("t2v", "i2v", "ti2v"), default="t2v",
                      help="t2v / i2v: two experts (MoE); ti2v: dense, 48-channel VAE")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    from relay.launch import bench_cli, plan_cli

    plan_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    return parser


def quiet_libraries() -> None:
    """Keeps diffusers/transformers load chatter (per-shard bars, advisories) off the terminal."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relay`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # relaunching under torchrun
    quiet_libraries()
    from relay.launch import commands

    from relay.launch import service_commands

    # Subcommands defined in their own modules carry their handler (set_defaults(handler=...)).
    handler = getattr(args, "handler", None) or {"generate": commands.generate, "resume": commands.resume,
               "make-tiny": commands.make_tiny, "serve": service_commands.serve,
               "submit": service_commands.submit, "demo": service_commands.demo}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"relay {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one plain line; RELAY_DEBUG=1 shows the traceback
        import os

        if os.environ.get("RELAY_DEBUG"):
            raise
        print(f"relay {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(set RELAY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
