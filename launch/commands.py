"""Implementations of the ``relay`` sub-commands (parsing lives in :mod:`launch.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine.errors import ModelError, ValidationError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _fail(command: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"relay {command}: error: {message}", file=sys.stderr)
    return code


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _check_output(path: str) -> Path:
    from engine.video import OUTPUT_SUFFIXES

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
    from engine.model_info import read_model_info
    from engine.tiny import default_model_dir

    return read_model_info(model if model else default_model_dir("t2v"))


class _Progress:
    """A tqdm bar over denoise steps (stderr), showing the expert and Relay's own ETA."""

    def __init__(self, total: int, *, start: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", desc="denoise", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)

    def __call__(self, event) -> None:
        self.bar.set_postfix_str(f"{event.expert} t={event.timestep} eta {event.eta:.1f}s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _finish(engine, run, *, output: Path, fps: int, quiet: bool, on_step=None) -> None:
    progress = _Progress(run.num_steps, start=run.step_index,
                         enabled=not quiet)
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
    from engine.video import write_output

    write_output(frames, output, fps=fps)
    _say(quiet, f"wrote {output}")


def generate(args: argparse.Namespace) -> int:
    """``relay generate``: validate, load, denoise, decode, write."""
    from engine.loader import load_model, load_tokenizer
    from engine.pipeline import Engine
    from engine.request import GenerationRequest, resolve_request

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
    except ValidationError as exc:
        return _fail("generate", f"{_flag(exc.field)}: {exc.message}")
    except ModelError as exc:
        return _fail("generate", f"--model: {exc}")
    _say(args.quiet, f"model {info.path} ({info.kind}); {resolved.width}x{resolved.height}, "
                     f"{resolved.frames} frames, {resolved.steps} steps, seed {resolved.seed}")
    try:
        model = load_model(info, dtype=args.dtype, device=args.device, tokenizer=tokenizer,
                           offload=args.offload)
    except ModelError as exc:
        return _fail("generate", f"--model: {exc}")
    engine = Engine(model)
    run = engine.start(engine.prepare(resolved))
    folder = Path(args.checkpoint_dir) if checkpoints else None

    def save_checkpoint(event) -> None:
        if event.step in checkpoints:
            folder.mkdir(parents=True, exist_ok=True)
            run.snapshot().save(folder / f"step-{event.step:04d}.pt")

    _finish(engine, run, output=output, fps=resolved.fps, quiet=args.quiet,
            on_step=save_checkpoint if folder else None)
    return EXIT_OK


def resume(args: argparse.Namespace) -> int:
    """``relay resume``: finish a generation from a snapshot."""
    from engine.loader import load_model
    from engine.pipeline import Engine
    from engine.state import DenoiseState

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
    from engine.tiny import make_tiny as build

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    path = build(args.directory, kind=args.kind, seed=args.seed)
    print(path)
    return EXIT_OK
