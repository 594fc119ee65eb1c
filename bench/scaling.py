"""``relay bench scaling``: the real engine at 1, 2, 4, ... devices on a Ray cluster, measured
against the layout planner's prediction.

At each size N the bench builds one fused worker group of N Ray actors (Ulysses over the N
devices, experts FSDP-sharded over them, as the official multi-GPU runs; ring when Ulysses
cannot divide the heads), runs a warm-up request and then ``--rounds`` requests, and records the
median seconds per denoise step (driver-side, one scheduler call per step) and per video. The
planner (:mod:`parallel.plan`) prices the same layout for the same transformer and request:

* *planned*: the cost model's absolute step time on ``--gpu`` (a catalog GPU; on a CPU a
  pseudo-GPU whose peak is this machine's measured fp32 matmul rate per rank and whose memory
  bandwidth is a measured copy rate);
* *scaled*: the 1-device measurement times the planner's ratio step(N) / step(1), which removes
  the absolute-efficiency error and tests only the scaling the planner predicts.

On a rented cluster: ``relay bench scaling --gpus 1,2,4,8 --gpu a6000 --model DIR --ray-address
auto``. On a CPU the tiny model is all per-call overhead, which the cost model leaves out on
purpose (it models 14B experts), so expect *planned* to be far below *measured* there.
"""

from __future__ import annotations

import dataclasses
import functools
import time

from relay.bench import common

SMOKE = dict(height=32, width=32, frames=5, steps=4, sizes="1,2")
FULL = dict(height=64, width=64, frames=9, steps=8, sizes="1,2,4")


def add_arguments(parser) -> None:
    """The scaling bench's flags."""
    parser.add_argument("--gpus", help="comma-separated device counts (default CPU 1,2,4, smoke 1,2; "
                                       "CUDA: powers of two up to the cluster's GPUs)")
    parser.add_argument("--gpu", help="catalog GPU kind for the plan (default: from the device name; "
                                      "on a CPU, a measured pseudo-GPU)")
    parser.add_argument("--model", help="Wan 2.2 directory (default: embedded tiny T2V)")
    parser.add_argument("--height", type=int, help=f"default {FULL['height']} (smoke {SMOKE['height']})")
    parser.add_argument("--width", type=int, help=f"default {FULL['width']} (smoke {SMOKE['width']})")
    parser.add_argument("--frames", type=int, help=f"default {FULL['frames']} (smoke {SMOKE['frames']})")
    parser.add_argument("--steps", type=int, help=f"default {FULL['steps']} (smoke {SMOKE['steps']})")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--ray-address", help="existing Ray cluster (default: a local one)")


def skip_reason(args) -> str | None:
    """Runs everywhere (on CPU with processes)."""
    return None


def _sizes(args, device) -> list[int]:
    text = args.gpus or (SMOKE if args.smoke else FULL)["sizes"]
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise common.SettingError(f"--gpus must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise common.SettingError(f"--gpus must be positive, got {text!r}")
    if args.gpus is None and device.type == "cuda":
        import ray

        have = int(ray.cluster_resources().get("GPU", 0))
        sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= have]
    return sizes


@functools.cache
def _core_rates() -> tuple[float, float]:
    """One core's fp32 matmul TFLOP/s and copy GB/s, measured once per run (measuring again for
    every size let the machine's noise reorder the sizes' prices)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        a @ b
        start, repeats = time.perf_counter(), 20
        for _ in range(repeats):
            a @ b
        tflops = 2 * 512**3 * repeats / (time.perf_counter() - start) / 1e12
        x = torch.empty(32 * 2**20 // 4)
        y = torch.empty_like(x)
        start = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        bandwidth = 2 * x.numel() * 4 * 10 / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(saved)
    return tflops, bandwidth


def _cpu_spec(threads: int):
    """A pseudo-GPU for this CPU at ``threads`` threads per rank: one core's measured rates
    times the threads."""
    from relay.parallel.cost import GpuSpec

    core_tflops, core_bandwidth = _core_rates()
    tflops, bandwidth = core_tflops * threads, core_bandwidth * threads
    return GpuSpec(name="cpu", aliases=(), description=f"{common.cpu_name()}, {threads} thread(s) per rank",
                   architecture="cpu", bf16_tflops=tflops, tf32_tflops=tflops, memory_gb=64,
                   memory_bandwidth_gbs=bandwidth, nvlink_gbs=0, nvlink_domain=1, pcie_gbs=2.0, p2p=True,
                   inter_node_gbs=1.0, gpus_per_node=1024,
                   source="measured by relay bench scaling; loopback 'link' 2 GB/s assumed")


def _model_spec(info, catalog_model: str | None):
    """The planner's model: the catalog entry, or one built from the directory's own configs."""
    from relay.parallel.cost import find_model, models

    if catalog_model:
        return find_model(catalog_model)
    base = next(m for m in models().values() if m.kind == info.kind)
    vae = dataclasses.replace(base.vae, spatial_stride=info.vae_spatial, temporal_stride=info.temporal_stride,
                              latent_channels=info.z_dim)
    return dataclasses.replace(base, name=info.path.name, transformer=dict(info.transformer_config), vae=vae)


def _workload(spec, resolved):
    from relay.parallel.cost import make_workload

    defaults = dataclasses.replace(spec.defaults, shift=resolved.shift, boundary=resolved.boundary,
                                   guidance=resolved.guidance, guidance_low=resolved.guidance_low)
    spec = dataclasses.replace(spec, defaults=defaults)
    return make_workload(spec, width=resolved.width, height=resolved.height, frames=resolved.frames,
                         steps=resolved.steps)


def _measure(info, resolved, experts, spec, layout, rounds: int, address) -> dict:
    from relay.launch.executor import Executor
    from relay.launch.placement import GroupPlan, Placement

    placement = Placement(kind="fused", groups=(GroupPlan(name="fused0", roles=("encode", "high_noise", "low_noise",
                                                                               "dense", "decode"), layout=layout),))
    spec = dataclasses.replace(spec, layout=layout)
    began = time.perf_counter()
    with Executor(placement, spec, backend="ray", ray_address=address) as executor:
        build_s = time.perf_counter() - began
        executor.scheduler.submit(resolved.to_dict(with_image=True), experts=experts).result(timeout=3600)
        steps, videos = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=experts)
            ticket.result(timeout=3600)
            videos.append(time.perf_counter() - start)
            steps.extend(ticket.step_seconds)
    return {"layout": layout.spec(), "build_s": build_s, "step_s": steps, "video_s": videos}


def run(args) -> common.BenchResult:
    """Measures each size, prices it, and prints measured vs planned."""
    import os

    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.stages import request_experts
    from relay.engine.tiny import default_model_dir
    from relay.launch.placement import default_group_layout
    from relay.launch.ray_group import connect, shutdown
    from relay.launch.worker import WorkerSpec
    from relay.parallel.cost import find_gpu, load_calibration
    from relay.parallel.plan import Planner

    base = SMOKE if args.smoke else FULL
    rounds = common.rounds(args, smoke=1, full=3)
    device = common.resolve_device(args.device)
    info = read_model_info(args.model or default_model_dir("t2v"))
    resolved = resolve_request(GenerationRequest(
        prompt="a lighthouse in a storm", height=args.height or base["height"], width=args.width or base["width"],
        frames=args.frames or base["frames"], steps=args.steps or base["steps"], seed=0), info)
    experts = request_experts(info, resolved)
    worker = WorkerSpec(model=str(info.path), layout=None, device_type=device.type,
                        dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    started = connect(args.ray_address)
    try:
        sizes = _sizes(args, device)
        measured = {n: _measure(info, resolved, experts, worker, default_group_layout(n, info.num_attention_heads),
                                rounds, args.ray_address) for n in sizes}
    finally:
        if started:
            shutdown()
    model_spec = _model_spec(info, None)
    work, cal = _workload(model_spec, resolved), load_calibration()
    planned = {}
    for n in sizes:
        if device.type == "cuda":
            gpu = find_gpu(args.gpu or common.device_name(device))
        else:
            gpu = find_gpu(args.gpu) if args.gpu else _cpu_spec(max(1, (os.cpu_count() or 1) // n))
        group = Planner(work, gpu, cal).group(default_group_layout(n, info.num_attention_heads), "fused")
        planned[n] = sum(work.expert_steps[e] * group.step_s[e] for e in group.step_s) / resolved.steps
    return _report(measured, planned, sizes, resolved, info, device, rounds, args.gpu, args.smoke)


def _report(measured, planned, sizes, resolved, info, device, rounds, gpu, smoke) -> common.BenchResult:
    base_n = sizes[0]
    step = {n: common.median(measured[n]["step_s"]) for n in sizes}
    video = {n: common.median(measured[n]["video_s"]) for n in sizes}
    rows, summary = [], {}
    for n in sizes:
        scaled = step[base_n] * planned[n] / planned[base_n]
        rows.append([str(n), measured[n]["layout"], f"{step[n]:.4f}", f"{planned[n]:.2e}", f"{scaled:.4f}",
                     f"{scaled / step[n] - 1:+.0%}", f"{step[base_n] / step[n]:.2f}x", f"{video[n]:.2f}"])
        summary[str(n)] = {"measured_step_s": step[n], "planned_step_s": planned[n], "scaled_step_s": scaled,
                           "measured_speedup": step[base_n] / step[n], "video_s": video[n]}
    priced_as = gpu or ("a measured pseudo-GPU" if device.type == "cpu" else "its catalog entry")
    title = (f"scaling on {common.device_name(device)}, priced as {priced_as}: "
             f"{info.path.name}, {resolved.width}x{resolved.height}x{resolved.frames}, {resolved.steps} steps, "
             f"{rounds} round(s) per size")
    notes = ["planned = the cost model's absolute step time; scaled = measured(1 size) x planned(N)/planned(1)",
             "the cost model prices FLOPs, memory traffic and collectives, not per-call overhead: on a "
             "tiny model that overhead is the step time, so planned << measured there"]
    table = common.format_table(["devices", "layout", "measured s/step", "planned s/step", "scaled s/step",
                                 "scaled err", "speed-up", "s/video"], rows, title=title, notes=notes)
    settings = {"sizes": sizes, "rounds": rounds, "height": resolved.height, "width": resolved.width,
                "frames": resolved.frames, "steps": resolved.steps, "model": str(info.path), "gpu": gpu,
                "smoke": smoke}
    return common.BenchResult(settings=settings, raw={str(n): measured[n] for n in sizes}, summary=summary,
                              table=table, device=str(device))
