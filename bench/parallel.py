"""``relay bench parallel``: per-step time of one request under each parallel layout that fits
this machine -- 1 process, Ulysses, ring, CFG-parallel and Ulysses + FSDP2 on 2 and 4 processes
(CPU: gloo, one CPU slice per process; CUDA: NCCL, one GPU per process, up to the GPU count).

Every layout runs through the runtime ``relay generate`` uses: an executor
(:mod:`launch.executor`; the 1-process baseline in this process, the others on spawned local
processes) and its stage scheduler. Each round builds one group per layout, runs one unmeasured
request (lazy initialisation of the libraries and kernels), then the measured one; rounds
rotate the layout order. The figure per layout is the median of the workers' own step times,
the first step of the run left out (it warms up). Process start-up and loading are not measured.
"""

from __future__ import annotations

from relay.bench import common

SMOKE = dict(height=64, width=64, frames=9, steps=4)
FULL = dict(height=128, width=128, frames=17, steps=8)


def add_arguments(parser) -> None:
    """The parallel bench's flags."""
    parser.add_argument("--sizes", help="comma-separated process counts (default: CPU 1,2,4, smoke 1,2; "
                                        "CUDA: 1, 2, 4, ... up to the GPU count)")
    parser.add_argument("--model", help="diffusers Wan 2.2 directory (default: embedded tiny T2V)")
    parser.add_argument("--height", type=int, help=f"default {FULL['height']} (smoke {SMOKE['height']})")
    parser.add_argument("--width", type=int, help=f"default {FULL['width']} (smoke {SMOKE['width']})")
    parser.add_argument("--frames", type=int, help=f"default {FULL['frames']} (smoke {SMOKE['frames']})")
    parser.add_argument("--steps", type=int, help=f"default {FULL['steps']} (smoke {SMOKE['steps']})")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one worker group may take")


def skip_reason(args) -> str | None:
    """Runs on every machine (the layouts are chosen to fit)."""
    return None


def layouts(sizes: list[int], heads: int) -> list[tuple[str, object]]:
    """``(name, ParallelLayout)`` for each process count in ``sizes``; Ulysses degrees that do
    not divide the model's ``heads`` are left out."""
    from relay.parallel.layout import LayoutError, ParallelLayout

    out = []
    for n in sizes:
        if n == 1:
            out.append(("1 process", ParallelLayout()))
            continue
        candidates = [(f"ulysses={n}", dict(ulysses_degree=n)), (f"ring={n}", dict(ring_degree=n)),
                      (f"cfg=2 x ulysses={n // 2}" if n > 2 else "cfg=2", dict(cfg_degree=2, ulysses_degree=n // 2)),
                      (f"ulysses={n} fsdp={n}", dict(ulysses_degree=n, fsdp_degree=n))]
        for name, degrees in candidates:
            try:
                layout = ParallelLayout(**degrees)
            except LayoutError:
                continue
            if layout.world_size == n and heads % layout.ulysses_degree == 0:
                out.append((name, layout))
    return out


def default_sizes(device, smoke: bool) -> list[int]:
    """CPU: 1, 2, 4 (smoke 1, 2); CUDA: powers of two up to the GPU count (smoke: up to 2)."""
    if device.type == "cuda":
        import torch

        count = torch.cuda.device_count()
        sizes = [n for n in (1, 2, 4, 8, 16) if n <= count]
    else:
        sizes = [1, 2, 4]
    return [n for n in sizes if n <= 2] if smoke else sizes


def measure(model: str, request: dict, experts: list, layout, *, dtype, device_type: str,
            timeout_s: float) -> dict:
    """One group of ``layout``: a warm-up request, then a measured one.

    Returns:
        ``{"step_s": [...], "load_s": s, "param_bytes": {...}}``: the workers' step times of the
        measured request, the group's build time, rank 0's parameter bytes per expert.
    """
    import time

    from relay.launch.executor import Executor, backend_for
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.engine.model_info import read_model_info
    from relay.engine.request import ResolvedRequest

    info = read_model_info(model)
    placement = plan_groups(info, ResolvedRequest(**request), layout=layout)
    spec = WorkerSpec(model=model, layout=layout, dtype=dtype, device_type=device_type)
    began = time.perf_counter()
    with Executor(placement, spec, backend=backend_for("local", placement), build_timeout_s=timeout_s) as executor:
        load_s = time.perf_counter() - began
        executor.scheduler.submit(request, experts=experts).result(timeout=timeout_s)
        steps: list[float] = []

        def on_event(kind: str, data: dict) -> None:
            if kind == "progress":
                steps.append(data["step_s"])

        executor.scheduler.submit(request, experts=experts, on_event=on_event).result(timeout=timeout_s)
    return {"step_s": steps, "load_s": load_s}


def _setup(args, device):
    """Model, resolved request and sizes for this run."""
    from relay.engine.models.wan.flops import video_tokens
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.tiny import default_model_dir

    base = SMOKE if args.smoke else FULL
    model = args.model or str(default_model_dir("t2v"))
    info = read_model_info(model)
    try:
        sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else default_sizes(device, args.smoke)
    except ValueError:
        sizes = []
    if not sizes or any(n < 1 for n in sizes):
        raise common.SettingError(f"--sizes must be comma-separated process counts, got {args.sizes!r}")
    fields = {key: getattr(args, key) or base[key] for key in base}
    request = resolve_request(GenerationRequest(prompt="a red robot", seed=0, guidance=4.0, guidance_low=3.0,
                                                **fields), info)
    tokens = video_tokens(info.transformer_config, height=request.height, width=request.width,
                          frames=request.frames, vae_spatial=info.vae_spatial, vae_temporal=info.temporal_stride)
    return model, info, request, sizes, tokens


def run(args) -> common.BenchResult:
    """Rounds over every layout; per layout the median step time.

    Returns:
        Raw per-run median step times (and every step time) per layout, the median per layout
        and its speed-up over the 1-process run.
    """
    from relay.engine.stages import request_experts

    device = common.resolve_device(args.device)
    n_rounds = common.rounds(args, smoke=1, full=3)
    model, info, request, sizes, tokens = _setup(args, device)
    experts = request_experts(info, request)
    chosen = layouts(sizes, info.num_attention_heads)
    raw = {name: {"world_size": layout.world_size, "median_step_s": [], "step_s": [], "load_s": []}
           for name, layout in chosen}
    for index in range(n_rounds):
        shift = index % len(chosen)
        for name, layout in chosen[shift:] + chosen[:shift]:
            report = measure(model, request.to_dict(with_image=True), experts, layout, dtype=args.dtype,
                             device_type=device.type, timeout_s=args.timeout)
            # The first step warms up; with a single step there is nothing else.
            raw[name]["median_step_s"].append(common.median(report["step_s"][1:] or report["step_s"]))
            raw[name]["step_s"].append(report["step_s"])
            raw[name]["load_s"].append(report["load_s"])
    summary = _summary(raw)
    settings = {"model": model, "device": device.type, "dtype": args.dtype or ("bf16" if device.type == "cuda"
                                                                               else "fp32"),
                "height": request.height, "width": request.width, "frames": request.frames,
                "steps": request.steps, "tokens": tokens, "guidance": [4.0, 3.0], "sizes": sizes,
                "rounds": n_rounds, "smoke": bool(args.smoke)}
    return common.BenchResult(settings=settings, raw=raw, summary=summary,
                              table=_table(settings, summary), device=str(device))


def _summary(raw: dict) -> dict:
    base = common.median(raw["1 process"]["median_step_s"]) if "1 process" in raw else None
    out = {}
    for name, entry in raw.items():
        med = common.median(entry["median_step_s"])
        out[name] = {"world_size": entry["world_size"], "median_step_s": med,
                     "speedup_vs_1": base / med if base else None}
    return out


def _table(settings: dict, summary: dict) -> str:
    rows = [[name, entry["world_size"], f"{entry['median_step_s']:.4f}",
             None if entry["speedup_vs_1"] is None else f"{entry['speedup_vs_1']:.2f}x"]
            for name, entry in summary.items()]
    title = (f"parallel: {settings['model']} | {settings['width']}x{settings['height']}x{settings['frames']} "
             f"({settings['tokens']} tokens), {settings['steps']} steps, CFG, {settings['dtype']}, "
             f"{settings['device']} | {settings['rounds']} round(s)")
    notes = ["s/step: median over rounds of each run's median step (first step left out)"]
    return common.format_table(["layout", "processes", "median s/step", "vs 1 process"], rows,
                               title=title, notes=notes)
