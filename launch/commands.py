"""Implementations of the ``relay`` sub-commands (parsing lives in :mod:`launch.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from relay.engine.errors import ModelError, ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fail(command: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"relay {command}: error: {message}", file=sys.stderr)
    return code


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _check_output(path: str) -> Path:
    from relay.engine.video import OUTPUT_SUFFIXES

    out = Path(path)
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ValidationError("output", f"must end in {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}")
    if out.is_dir():
        raise ValidationError("output", f"{path} is a directory")
    return out


def _read_image(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError("image", f"cannot read {path}: {exc.strerror or exc}") from None


def _checkpoint_steps(text: str, directory: str | None, steps: int) -> set[int]:
    if not text:
        return set()
    if directory is None:
        raise ValidationError("checkpoint_dir", "is required with --checkpoint-at")
    try:
        wanted = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValidationError("checkpoint_at", f"must be comma-separated integers, got {text!r}") from None
    bad = sorted(k for k in wanted if not 1 <= k < steps)
    if bad:
        raise ValidationError("checkpoint_at", f"step counts must be in 1..{steps - 1}, got {bad}")
    return wanted


def _model_info(model: str | None):
    from relay.engine.model_info import read_model_info
    from relay.engine.tiny import default_model_dir

    return read_model_info(model if model else default_model_dir("t2v"))


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _finish(engine, run, *, output: Path, fps: int, quiet: bool, on_step=None) -> None:
    from relay.launch.progress import StepProgress

    progress = StepProgress(run.num_steps, start=run.step_index, enabled=not quiet)
    try:
        def callback(event):
            progress(event)
            if on_step is not None:
                on_step(event)
        run.run(callback=callback)
    finally:
        progress.close()
    started = time.perf_counter()
    frames = engine.decode(run)
    _say(quiet, f"decoded {frames.shape[0]} frames in {time.perf_counter() - started:.1f}s")
    from relay.engine.video import write_output

    write_output(frames, output, fps=fps)
    _say(quiet, f"wrote {output}")


def _layout(args, info, resolved):
    """The parallel layout the flags ask for, validated against the model and the machine."""
    import torch

    from relay.parallel.layout import ParallelLayout

    if args.placement == "staged":  # each stage group has its own layout (launch.placement)
        return ParallelLayout()
    fsdp = args.fsdp
    layout = ParallelLayout.from_flags(nproc=args.nproc, ulysses=args.ulysses, ring=args.ring,
                                       cfg=args.cfg_parallel, fsdp=True if fsdp == -1 else fsdp)
    layout.check_model(num_heads=info.num_attention_heads,
                       guidance_needs_uncond=resolved.guidance > 1 or (resolved.guidance_low or 0) > 1)
    device_type = _device_type(args)
    local = args.executor != "ray"  # a Ray cluster's GPUs are checked when the groups reserve them
    if local and layout.world_size > 1 and device_type == "cuda" and torch.cuda.device_count() < args.nproc:
        raise ValidationError("nproc", f"{args.nproc} processes but only {torch.cuda.device_count()} GPUs")
    if layout.world_size > 1 and args.offload and layout.fsdp_degree == 1:
        raise ValidationError("offload", "in a group offloads FSDP shards: add --fsdp")
    return layout


def _check_executor(args) -> None:
    """Placement flags that need the Ray executor, or that conflict with the layout flags."""
    executor = getattr(args, "executor", "local")
    if executor != "ray":
        for flag, given in (("placement", args.placement != "fused"), ("replicas", args.replicas != 1),
                            ("stage_split", args.stage_split), ("high_layout", args.high_layout),
                            ("low_layout", args.low_layout), ("ray_address", args.ray_address)):
            if given:
                raise ValidationError(flag, "needs --executor ray")
    if args.placement == "staged" and any(v is not None for v in (args.ulysses, args.ring, args.cfg_parallel, args.fsdp)):
        raise ValidationError("placement", "staged groups take --high-layout / --low-layout, "
                                           "not --ulysses / --ring / --cfg-parallel / --fsdp")
    from relay.launch.ray_commands import scheduler_config

    scheduler_config(args)


def _device_type(args) -> str:
    import torch

    if args.device:
        return torch.device(args.device).type
    return "cuda" if torch.cuda.is_available() else "cpu"


def generate(args: argparse.Namespace, rank_info=None) -> int:
    """``relay generate``: validate, load, denoise, decode, write.

    With ``--nproc N`` (or ``rank_info`` from torchrun) the denoising runs on a worker group.
    """
    from relay.engine.loader import load_model, load_tokenizer
    from relay.engine.pipeline import Engine
    from relay.engine.request import GenerationRequest, resolve_request

    try:
        output = _check_output(args.output)
        info = _model_info(args.model)
        request = GenerationRequest(
            prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
            width=args.width, frames=args.frames, steps=args.steps, seed=args.seed,
            guidance=args.guidance, guidance_low=args.guidance_low, shift=args.shift,
            boundary=args.boundary, fps=args.fps, image=_read_image(args.image),
        )
        tokenizer = load_tokenizer(info)
        resolved = resolve_request(request, info, tokenizer=tokenizer)
        checkpoints = _checkpoint_steps(args.checkpoint_at, args.checkpoint_dir, resolved.steps)
        layout = _layout(args, info, resolved)
        _check_executor(args)
    except ValidationError as exc:
        return _fail("generate", f"{_flag(exc.field)}: {exc.message}")
    except ModelError as exc:
        return _fail("generate", f"--model: {exc}")
    _say(args.quiet, f"model {info.path} ({info.kind}); {resolved.width}x{resolved.height}, "
                     f"{resolved.frames} frames, {resolved.steps} steps, seed {resolved.seed}")
    if rank_info is None and args.executor == "ray":
        from relay.launch.ray_commands import generate_on_ray

        return generate_on_ray(args, info, resolved, layout, output, checkpoints)
    if rank_info is None and args.executor == "torchrun":
        from relay.launch.ray_commands import generate_under_torchrun

        return generate_under_torchrun(args)
    if layout.world_size > 1 or rank_info is not None:
        return _generate_in_group(args, info, resolved, layout, checkpoints, output, rank_info)
    try:
        model = load_model(info, dtype=args.dtype, device=args.device, tokenizer=tokenizer,
                           offload=args.offload)
    except ModelError as exc:
        return _fail("generate", f"--model: {exc}")
    engine = Engine(model)
    run = engine.start(engine.prepare(resolved))
    from relay.launch.progress import checkpoint_writer

    _finish(engine, run, output=output, fps=resolved.fps, quiet=args.quiet,
            on_step=checkpoint_writer(run, args.checkpoint_dir, checkpoints) if checkpoints else None)
    return EXIT_OK


def _generate_in_group(args, info, resolved, layout, checkpoints, output, rank_info) -> int:
    from relay.launch.worker import GenerateJob, run_generation

    job = GenerateJob(
        model=str(info.path), request=resolved.to_dict(with_image=True), layout=layout,
        dtype=args.dtype, device_type=_device_type(args), output=str(output),
        text_encoder=args.text_encoder, offload=args.offload, checkpoint_dir=args.checkpoint_dir,
        checkpoint_at=tuple(sorted(checkpoints)), quiet=args.quiet,
    )
    _say(args.quiet, f"layout {layout.describe()}")
    if rank_info is not None:
        run_generation(rank_info, job)
        return EXIT_OK
    from relay.launch.local import spawn_group

    reports = spawn_group(job, layout.world_size)
    for report in reports:
        sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in report["param_bytes"].items())
        _say(args.quiet, f"rank {report['rank']}: parameters {sizes}; {report['total_s']:.1f}s")
    return EXIT_OK


def resume(args: argparse.Namespace) -> int:
    """``relay resume``: finish a generation from a snapshot."""
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine
    from relay.engine.state import DenoiseState

    try:
        output = _check_output(args.output)
        info = _model_info(args.model)
        try:
            state = DenoiseState.load(args.state)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ValidationError("state", f"cannot read snapshot {args.state}: {exc}") from None
    except ValidationError as exc:
        return _fail("resume", f"{_flag(exc.field)}: {exc.message}")
    except ModelError as exc:
        return _fail("resume", f"--model: {exc}")
    try:
        model = load_model(info, dtype=args.dtype, device=args.device, offload=args.offload)
    except ModelError as exc:
        return _fail("resume", f"--model: {exc}")
    missing = set(state.experts[state.step_index:]) - set(model.experts)
    if missing:
        return _fail("resume", f"--model: snapshot needs experts {sorted(missing)}, model has {sorted(model.experts)}")
    engine = Engine(model)
    _say(args.quiet, f"resuming at step {state.step_index}/{state.num_steps}")
    _finish(engine, engine.start(state), output=output, fps=int(state.request["fps"]), quiet=args.quiet)
    return EXIT_OK


def make_tiny(args: argparse.Namespace) -> int:
    """``relay make-tiny``: write a tiny random model."""
    from relay.engine.tiny import make_tiny as build

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    path = build(args.directory, kind=args.kind, seed=args.seed)
    print(path)
    return EXIT_OK
