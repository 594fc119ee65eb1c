"""``relay bench cache``: what each feature cache skips and what it changes, side by side.

One engine (the embedded tiny T2V-A14B model, or ``--model``) runs the same request -- same seed
and settings -- with no cache and with each cache in ``--caches``, interleaved over ``--rounds``
rounds (machines are noisy: every round runs every setting once, and the table reports each
setting's median time as a ratio to no cache measured in the same rounds). Per setting: the
forwards computed and skipped per expert, the denoise time ratio, and the max / mean absolute
difference and PSNR of the frames against the uncached video.

On the tiny model the time ratio mostly shows the per-forward overhead that a skip saves; the
counts and differences are what transfer to a full-size model (a skipped forward there saves
~all of a step's transformer time: one block of 40 still runs).
"""

from __future__ import annotations

import math
import time

from relay.bench import common

DEFAULT_CACHES = "fbc:0.02,fbc:0.05,fbc:0.1,taylorseer:interval=2,warmup=2,taylorseer:interval=3,warmup=2"


def add_arguments(parser) -> None:
    """The cache bench's flags."""
    parser.add_argument("--model", help="model directory (default: the embedded tiny T2V-A14B)")
    parser.add_argument("--caches", default=DEFAULT_CACHES,
                        help="cache specs to compare with none, separated by ';' or ',' between specs "
                             f"(default {DEFAULT_CACHES})")
    parser.add_argument("--size", default="64x64x17", help="WIDTHxHEIGHTxFRAMES (default 64x64x17)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")


def skip_reason(args) -> str | None:
    """Runs everywhere."""
    return None


def split_specs(text: str) -> list[str]:
    """Cache specs from ``a;b`` or from a comma list where a new spec starts at a known kind."""
    from relay.engine.caches import CACHE_KINDS

    if ";" in text:
        return [part.strip() for part in text.split(";") if part.strip()]
    specs: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.split(":")[0].lower() in CACHE_KINDS or not specs:
            specs.append(part)
        else:
            specs[-1] += "," + part
    return specs


def _psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run(args) -> common.BenchResult:
    """Runs no cache and every ``--caches`` spec ``--rounds`` times (default 3, smoke 1)."""
    import numpy as np

    from relay.engine import Engine, GenerationRequest, load_model
    from relay.engine.caches import CacheSpec
    from relay.engine.errors import ValidationError
    from relay.engine.tiny import default_model_dir

    try:
        width, height, frames = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise common.SettingError(f"--size must be WIDTHxHEIGHTxFRAMES, got {args.size!r}") from None
    specs = split_specs(args.caches)
    try:
        specs = [CacheSpec.parse(s).text() for s in specs]
    except ValidationError as exc:
        raise common.SettingError(f"--caches: {exc.message}") from None
    steps = 8 if args.smoke else args.steps
    if args.smoke:
        width, height, frames = 32, 32, 5
    rounds = common.rounds(args, smoke=1, full=3)
    device = common.resolve_device(args.device)
    model_dir = args.model or str(default_model_dir("t2v"))
    engine = Engine(load_model(model_dir, device=device, dtype="fp32" if device.type == "cpu" else "bf16"))
    settings = dict(prompt="a lighthouse in a storm, waves crashing", negative_prompt="blurry", width=width,
                    height=height, frames=frames, steps=steps, seed=11)
    labels = ["none", *specs]
    raw = {label: {"seconds": [], "skipped": {}, "forwards": {}} for label in labels}
    frames_of = {}
    for _ in range(rounds):
        for label in labels:
            events = []
            request = engine.resolve(GenerationRequest(**settings, cache=None if label == "none" else label))
            state = engine.prepare(request)
            began = time.perf_counter()
            run_ = engine.start(state)
            run_.run(callback=events.append)
            raw[label]["seconds"].append(time.perf_counter() - began)
            frames_of[label] = engine.decode(run_)
            for key in ("skipped", "forwards"):
                raw[label][key] = {e: sum(getattr(ev, key) for ev in events if ev.expert == e)
                                   for e in dict.fromkeys(ev.expert for ev in events)}
    base = frames_of["none"]
    base_s = common.median(raw["none"]["seconds"])
    rows, summary = [], {}
    for label in labels:
        diff = np.abs(frames_of[label] - base)
        s = common.median(raw[label]["seconds"])
        skipped, forwards = raw[label]["skipped"], raw[label]["forwards"]
        total = sum(skipped.values()) + sum(forwards.values())
        summary[label] = {"skipped": skipped, "forwards": forwards, "skipped_fraction": sum(skipped.values()) / total,
                          "denoise_s": s, "time_ratio": s / base_s, "max_abs_diff": float(diff.max()),
                          "mean_abs_diff": float(diff.mean()), "psnr_db": _psnr(frames_of[label], base)}
        row = summary[label]
        rows.append([label, " / ".join(f"{forwards[e]}+{skipped[e]}" for e in forwards),
                     f"{row['skipped_fraction']:.0%}", f"{s:.2f}", f"{row['time_ratio']:.2f}",
                     f"{row['max_abs_diff']:.3g}", f"{row['mean_abs_diff']:.3g}",
                     "inf" if math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.1f}"])
    table = common.format_table(
        ["cache", "computed+skipped per expert", "skipped", "denoise s", "x none", "max |diff|", "mean |diff|",
         "PSNR dB"], rows,
        title=f"feature caches: {width}x{height}x{frames}, {steps} steps, guidance on, {rounds} interleaved rounds "
              f"({common.device_name(device)})",
        notes=["frames in [0, 1]; differences and PSNR against the uncached video of the same seed",
               "a tiny model's time ratio is mostly per-forward overhead; the skip counts are what transfer"])
    return common.BenchResult(settings={"model": model_dir, "width": width, "height": height, "frames": frames,
                                        "steps": steps, "caches": specs, "rounds": rounds, "smoke": args.smoke},
                              raw=raw, summary=summary, table=table, device=str(device))
