"""Benchmark (not a test): Relay's engine vs diffusers' WanPipeline, same model, one process.

Runs are interleaved (A, B, A, B, ...) so machine noise hits both alike; the figure of merit is
the median of the per-round time ratios. Default: the embedded tiny T2V model on the CPU.

    .venv/bin/python bench/engine_vs_diffusers.py [--model DIR] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers Wan 2.2 T2V directory (default: embedded tiny)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--json", help="also write the raw timings here")
    args = parser.parse_args()

    from diffusers import WanPipeline
    from diffusers.utils import logging as dlog

    from engine.loader import DTYPES, default_device, default_dtype, load_model
    from engine.pipeline import Engine
    from engine.request import GenerationRequest
    from engine.tiny import default_model_dir

    dlog.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = Path(args.model) if args.model else default_model_dir("t2v")
    device = default_device()
    dtype = args.dtype or default_dtype(device)
    engine = Engine(load_model(model_dir, dtype=dtype, device=device))
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(model_dir, vae=vae, dtype=DTYPES[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    shift = engine.info.defaults.shift
    from diffusers import UniPCMultistepScheduler

    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    settings = dict(height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                    seed=0, guidance=4.0, guidance_low=3.0, shift=shift)
    request = engine.resolve(GenerationRequest(prompt="a red robot in a neon city", **settings))

    def relay_once():
        return engine.generate(request)

    def diffusers_once():
        return pipe(prompt=request.prompt, height=args.height, width=args.width,
                    num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=4.0,
                    guidance_scale_2=3.0, generator=torch.Generator().manual_seed(0),
                    output_type="np").frames[0]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    relay_once(), diffusers_once()  # warm-up (allocator, kernels, lazy imports)
    rows, max_diff = [], 0.0
    for _ in range(args.rounds):
        t_relay, a = timed(relay_once)
        t_diff, b = timed(diffusers_once)
        rows.append((t_relay, t_diff))
        max_diff = max(max_diff, float(np.abs(a - b).max()))
    ratios = [r / d for r, d in rows]
    relay_med = statistics.median(r for r, _ in rows)
    diff_med = statistics.median(d for _, d in rows)
    print(f"model {model_dir} | device {device} | dtype {dtype} | {args.width}x{args.height}x"
          f"{args.frames}, {args.steps} steps | {args.rounds} interleaved rounds")
    print(f"{'runner':<22}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, col in (("relay engine", 0), ("diffusers WanPipeline", 1)):
        values = [row[col] for row in rows]
        print(f"{name:<22}{statistics.median(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")
    print(f"median ratio relay/diffusers: {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}..{max(ratios):.3f}); max |frame diff| {max_diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "settings": settings, "dtype": dtype,
            "relay_s": [r for r, _ in rows], "diffusers_s": [d for _, d in rows],
            "median_ratio": statistics.median(ratios), "relay_median_s": relay_med,
            "diffusers_median_s": diff_med, "max_abs_diff": max_diff,
        }, indent=2))


if __name__ == "__main__":
    main()
