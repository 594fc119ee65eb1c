"""``relay bench parallel``: per-step time of one request under each parallel layout that fits
this machine -- 1 process, Ulysses, ring, CFG-parallel and Ulysses + FSDP2 on 2 and 4 processes
(CPU: gloo, one CPU slice per process; CUDA: NCCL, one GPU per process, up to the GPU count).

Every layout, the 1-process baseline included, runs through the real worker entry point
(:func:`launch.worker.run_generation`) in spawned processes. To keep process start-up and
library imports out of the measurement and the bench short, each round starts one group per
process count and runs all of that count's layouts in it, one after another (a fresh process
group per layout, torn down in between). Rounds rotate the layout order. The figure per layout
is the median step time, the first step of every run left out (it warms up); each group first
runs one unmeasured job.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import time
import uuid

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


def _group_entry(rank: int, world_size: int, jobs: list, init_methods: list[str], results) -> None:
    """One rank of a bench group: runs every job in turn, each in a fresh process group."""
    from relay.launch.worker import run_generation
    from relay.parallel.groups import RankInfo

    for index, (job, init) in enumerate(zip(jobs, init_methods)):
        info = RankInfo(rank=rank, local_rank=rank, world_size=world_size, init_method=init)
        report = run_generation(info, job)
        if rank == 0:
            results.put((index, report))


def run_group(jobs: list, world_size: int, rendezvous_dir: str, *, timeout_s: float) -> list[dict]:
    """Runs ``jobs`` one after another on ``world_size`` spawned processes.

    Returns:
        Rank 0's report of each job, in job order.

    Raises:
        RuntimeError: a rank failed (the others are terminated) or the group outlived ``timeout_s``.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    tag = uuid.uuid4().hex[:8]
    inits = [f"file://{rendezvous_dir}/rdzv-{tag}-{index}" for index in range(len(jobs))]
    procs = [context.Process(target=_group_entry, name=f"relay-bench-rank{rank}",
                             args=(rank, world_size, jobs, inits, results)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    reports: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) < len(jobs):
            try:
                index, report = results.get(timeout=0.5)
                reports[index] = report
                continue
            except queue.Empty:
                pass
            failed = [proc for proc in procs if proc.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"{failed[0].name} exited with code {failed[0].exitcode}")
            if all(proc.exitcode == 0 for proc in procs) and results.empty():
                raise RuntimeError("worker group exited without reporting every job")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker group exceeded {timeout_s:.0f}s")
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [reports[index] for index in range(len(jobs))]


def _setup(args, device):
    """Model, resolved request and sizes for this run."""
    from relay.engine.flops import video_tokens
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
    from relay.launch.worker import GenerateJob

    device = common.resolve_device(args.device)
    n_rounds = common.rounds(args, smoke=1, full=3)
    model, info, request, sizes, tokens = _setup(args, device)
    chosen = layouts(sizes, info.num_attention_heads)
    raw = {name: {"world_size": layout.world_size, "median_step_s": [], "step_s": [], "load_s": []}
           for name, layout in chosen}
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        for index in range(n_rounds):
            for n in sizes:
                group = [(name, layout) for name, layout in chosen if layout.world_size == n]
                if not group:
                    continue
                shift = index % len(group)
                group = group[shift:] + group[:shift]
                jobs = [GenerateJob(model=model, request=request.to_dict(with_image=True), layout=layout,
                                    dtype=args.dtype, device_type=device.type, output=f"{tmp}/out-{n}.npy",
                                    quiet=True) for _, layout in group]
                # A fresh group runs one unmeasured job first: lazy initialisation of the libraries
                # and kernels would otherwise land on whichever layout comes first.
                reports = run_group(jobs[:1] + jobs, n, tmp, timeout_s=args.timeout)[1:]
                for (name, _), report in zip(group, reports):
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
