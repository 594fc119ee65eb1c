"""``relay bench engine``: Relay's engine vs diffusers' own pipeline (``WanPipeline``, or
``LTX2Pipeline`` for an LTX-2 model) on the same model, in one process, with the same settings.

Runs are interleaved (Relay, diffusers, then diffusers, Relay in the next round, ...) so that
machine noise and any order effect hit both alike; the figure of merit is the median of the
per-round time ratios Relay / diffusers. Both produce frames from the same seed; the largest
absolute difference between the two videos is reported (0 on the CPU in fp32 for Wan; LTX-2's
text connectors and guidance run per branch in Relay and batched in diffusers: ~1e-6). Default:
the embedded tiny Wan T2V model on the default device (``--family ltx2`` for the embedded tiny
LTX-2, ``--model`` for another folder, e.g. a small bf16 model on a GPU).
"""

from __future__ import annotations

from relay.bench import common

PROMPT = "a red robot in a neon city"
GUIDANCE, GUIDANCE_LOW = 4.0, 3.0


def add_arguments(parser) -> None:
    """The engine bench's flags."""
    parser.add_argument("--model", help="diffusers Wan 2.2 T2V or LTX-2 directory (default: the embedded tiny one "
                                        "of --family)")
    parser.add_argument("--family", choices=("wan2.2", "ltx2"), default="wan2.2",
                        help="the embedded tiny model without --model (default wan2.2)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, help="denoising steps (default 8; smoke 4)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="default: bf16 on CUDA, fp32 on CPU")


def skip_reason(args) -> str | None:
    """Runs on every machine."""
    return None


def _runners(args, device):
    """Builds both runners on the same model and settings; returns ``(relay, diffusers, info)``."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from diffusers.utils import logging as diffusers_logging

    from relay.engine.loader import DTYPES, default_dtype, load_model
    from relay.engine.pipeline import Engine
    from relay.engine.request import GenerationRequest
    from relay.engine.tiny import default_model_dir

    diffusers_logging.disable_progress_bar()
    model_dir = args.model or str(default_model_dir(*(("ti2v", "ltx2") if args.family == "ltx2" else ("t2v",))))
    dtype = args.dtype or default_dtype(device)
    steps = args.steps or (4 if args.smoke else 8)
    engine = Engine(load_model(model_dir, dtype=dtype, device=device))
    if engine.info.family == "ltx2":
        return _ltx2_runners(engine, model_dir, dtype, steps, args, device)
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(model_dir, vae=vae, dtype=DTYPES[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    shift = engine.info.defaults.shift
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=shift)
    request = engine.resolve(GenerationRequest(
        prompt=PROMPT, height=args.height, width=args.width, frames=args.frames, steps=steps, seed=0,
        guidance=GUIDANCE, guidance_low=GUIDANCE_LOW, shift=shift))

    def relay():
        return engine.generate(request)

    def diffusers():
        # Relay draws its noise on the CPU; a CPU generator gives diffusers the same noise.
        return pipe(prompt=PROMPT, height=request.height, width=request.width, num_frames=request.frames,
                    num_inference_steps=request.steps, guidance_scale=GUIDANCE, guidance_scale_2=GUIDANCE_LOW,
                    generator=torch.Generator().manual_seed(0), output_type="np").frames[0]

    settings = {"model": model_dir, "dtype": dtype, "height": request.height, "width": request.width,
                "frames": request.frames, "steps": request.steps, "seed": 0, "guidance": GUIDANCE,
                "guidance_low": GUIDANCE_LOW, "shift": shift}
    return relay, diffusers, settings


def _ltx2_runners(engine, model_dir, dtype, steps, args, device):
    """Relay's engine and ``LTX2Pipeline`` at the pipeline's default guidance (four forwards per
    step), STG on the model's last block when it has no block 28."""
    import torch
    from diffusers import LTX2Pipeline

    from relay.engine.loader import DTYPES
    from relay.engine.request import GenerationRequest

    request = engine.resolve(GenerationRequest(prompt=PROMPT, height=args.height, width=args.width,
                                               frames=args.frames, steps=steps, seed=0, guidance=3.0))
    terms = request.guidance_terms
    pipe = LTX2Pipeline.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)

    def relay():
        return engine.generate(request)

    def diffusers():
        return pipe(prompt=PROMPT, height=request.height, width=request.width, num_frames=request.frames,
                    num_inference_steps=request.steps, frame_rate=float(request.fps), guidance_scale=3.0,
                    audio_guidance_scale=terms["audio"], stg_scale=terms["stg"], audio_stg_scale=terms["audio_stg"],
                    modality_scale=terms["modality"], audio_modality_scale=terms["audio_modality"],
                    guidance_rescale=terms["rescale"], audio_guidance_rescale=terms["audio_rescale"],
                    spatio_temporal_guidance_blocks=list(terms["stg_blocks"]),
                    generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False)[0][0]

    settings = {"model": model_dir, "family": "ltx2", "dtype": dtype, "height": request.height,
                "width": request.width, "frames": request.frames, "steps": request.steps, "seed": 0,
                "guidance": 3.0, "guidance_terms": {k: list(v) if isinstance(v, tuple) else v for k, v in terms.items()},
                "shift": request.shift}
    return relay, diffusers, settings


def run(args) -> common.BenchResult:
    """Interleaved rounds of both runners after one warm-up each.

    Returns:
        Raw per-round seconds of both, the median ratio Relay / diffusers (with its range), and
        the largest absolute frame difference.
    """
    import numpy as np

    device = common.resolve_device(args.device)
    n_rounds = common.rounds(args, smoke=2, full=7)
    relay, diffusers, settings = _runners(args, device)
    relay(), diffusers()  # warm-up: allocator, kernels, lazy imports
    times = {"relay": [], "diffusers": []}
    max_diff = 0.0
    for index in range(n_rounds):
        order = (("relay", relay), ("diffusers", diffusers))
        frames = {}
        for name, fn in order if index % 2 == 0 else order[::-1]:
            seconds, frames[name] = common.timed(fn, device)
            times[name].append(seconds)
        max_diff = max(max_diff, float(np.abs(frames["relay"] - frames["diffusers"]).max()))
    ratio = common.ratio_summary(times["relay"], times["diffusers"])
    summary = {"relay_median_s": common.median(times["relay"]),
               "diffusers_median_s": common.median(times["diffusers"]),
               "median_ratio": ratio["median"], "ratio_min": ratio["min"], "ratio_max": ratio["max"],
               "max_abs_diff": max_diff, "identical": max_diff == 0.0}
    settings.update(device=str(device), rounds=n_rounds, smoke=bool(args.smoke))
    raw = {"relay_s": times["relay"], "diffusers_s": times["diffusers"], "ratios": ratio["per_round"]}
    return common.BenchResult(settings=settings, raw=raw, summary=summary,
                              table=_table(settings, times, ratio, max_diff), device=str(device))


def _table(settings: dict, times: dict, ratio: dict, max_diff: float) -> str:
    rows = []
    pipeline = "LTX2Pipeline" if settings.get("family") == "ltx2" else "WanPipeline"
    for label, key in (("relay engine", "relay"), (f"diffusers {pipeline}", "diffusers")):
        values = times[key]
        rows.append([label, f"{common.median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}"])
    frames = "identical" if max_diff == 0.0 else f"max |diff| {max_diff:.2e}"
    title = (f"engine: relay vs diffusers | {settings['model']} | {settings['device']} {settings['dtype']} | "
             f"{settings['width']}x{settings['height']}x{settings['frames']}, {settings['steps']} steps, "
             f"{'CFG+STG+modality' if settings.get('family') == 'ltx2' else 'CFG'} | "
             f"{settings['rounds']} interleaved rounds")
    notes = [(f"median ratio relay/diffusers: {ratio['median']:.3f} "
              f"(range {ratio['min']:.3f}..{ratio['max']:.3f}); frames {frames}")]
    return common.format_table(["runner", "median s", "min s", "max s"], rows, title=title, notes=notes)
