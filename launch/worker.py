"""The worker entry point shared by every launcher: rank information in, one generation out.

``torchrun``, the local spawner (``relay generate --nproc N``) and (later) Ray actors all reduce
to :class:`parallel.groups.RankInfo` and call :func:`run_generation`. Every rank runs the same
sequence of forwards (lock-step); rank 0 reports progress, writes checkpoints and the output.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from parallel.groups import RankInfo
from parallel.layout import ParallelLayout

TEXT_ENCODER_PLACEMENTS = ("device", "cpu", "fsdp")


@dataclass(frozen=True, kw_only=True)
class GenerateJob:
    """Everything a worker needs for one generation (picklable; no tensors).

    Attributes:
        model: Model directory.
        request: ``ResolvedRequest.to_dict(with_image=True)``; rank 0's copy is authoritative.
        layout: The parallel layout of the group.
        dtype: ``bf16`` / ``fp16`` / ``fp32`` or ``None`` for the device default.
        device_type: ``cuda`` or ``cpu``.
        output: Output path (written by rank 0).
        text_encoder: ``device`` (a copy per rank), ``cpu`` (run on the host) or ``fsdp``
            (sharded over every rank).
        offload: Keep FSDP shards in host memory between uses (FSDP2 CPU offload), for GPUs
            too small to hold even a shard of an expert next to the activations.
        checkpoint_dir: Where rank 0 writes snapshots, if anywhere.
        checkpoint_at: Step counts after which to snapshot.
        quiet: No progress bar.
    """

    model: str
    request: dict
    layout: ParallelLayout
    dtype: str | None
    device_type: str
    output: str
    text_encoder: str = "device"
    offload: bool = False
    checkpoint_dir: str | None = None
    checkpoint_at: tuple[int, ...] = ()
    quiet: bool = False


def _load(job: GenerateJob, groups):
    """Loads the model for this rank: FSDP-sharded experts when the layout asks for it."""
    from engine.loader import DTYPES, default_dtype, expert_folders, load_model
    from engine.model_info import read_model_info

    info = read_model_info(job.model)
    device = groups.device
    dtype_name = job.dtype or default_dtype(device)
    sharded = groups.fsdp_mesh is not None
    model = load_model(info, dtype=dtype_name, device=device, experts=() if sharded else None,
                       text_encoder=job.text_encoder == "device")
    torch_dtype = DTYPES[dtype_name]
    if sharded:
        from parallel.fsdp import load_sharded_transformer

        for name, folder in expert_folders(info).items():
            model.experts[name] = load_sharded_transformer(
                info.path, folder, mesh=groups.fsdp_mesh, device=device, dtype=torch_dtype,
                offload=job.offload)
    if job.text_encoder == "fsdp" and groups.world_mesh is not None:
        from parallel.fsdp import load_sharded_text_encoder

        model.text_encoder = load_sharded_text_encoder(
            info.path / "text_encoder", mesh=groups.world_mesh, device=device, dtype=torch_dtype,
            offload=job.offload)
    elif job.text_encoder != "device":
        from engine.loader import load_text_encoder

        model.text_encoder = load_text_encoder(
            info, dtype=torch_dtype, device=torch.device("cpu") if job.text_encoder == "cpu" else device)
    return model


def run_generation(info: RankInfo, job: GenerateJob) -> dict:
    """Joins the group, generates, and (on rank 0) writes the output.

    Returns:
        A small report: rank, per-rank parameter bytes of each expert, timings.
    """
    import torch.distributed as dist

    from engine.pipeline import Engine
    from engine.request import ResolvedRequest
    from parallel import parallelize
    from parallel.cfg import CfgParallelPredictor
    from parallel.fsdp import local_parameter_bytes
    from parallel.groups import destroy_groups, init_groups

    from launch.cli import quiet_libraries

    quiet_libraries()
    if job.device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
    groups = init_groups(job.layout, info, device_type=job.device_type)
    try:
        shared = [job.request]
        dist.broadcast_object_list(shared, src=0)  # every rank uses rank 0's request (and seed)
        request = ResolvedRequest(**shared[0])
        started = time.perf_counter()
        model = _load(job, groups)
        handles = [parallelize(expert, groups) for expert in model.experts.values()]
        param_bytes = {name: local_parameter_bytes(expert) for name, expert in model.experts.items()}
        engine = Engine(model)
        predict = CfgParallelPredictor(groups.cfg_group, groups.cfg_rank) if groups.cfg_group else None
        run = engine.start(engine.prepare(request), predict=predict)
        loaded = time.perf_counter() - started
        step_s = _denoise(run, job, groups.is_output_rank)
        if groups.is_output_rank:
            from engine.video import write_output

            write_output(engine.decode(run), job.output, fps=request.fps)
            if not job.quiet:
                print(f"wrote {job.output}", file=sys.stderr, flush=True)
        for handle in handles:
            if handle is not None:
                handle.remove()
        dist.barrier()
        return {"rank": info.rank, "param_bytes": param_bytes, "load_s": loaded, "step_s": step_s,
                "total_s": time.perf_counter() - started}
    finally:
        destroy_groups()


def _denoise(run, job: GenerateJob, reporting: bool) -> list[float]:
    """Runs every step; returns each step's wall time in seconds."""
    from launch.progress import StepProgress, checkpoint_writer

    save = checkpoint_writer(run, job.checkpoint_dir, job.checkpoint_at) if job.checkpoint_dir and reporting else None
    bar = StepProgress(run.num_steps, desc=f"denoise x{job.layout.world_size}") if reporting and not job.quiet else None
    elapsed = [0.0]

    def on_step(event) -> None:
        elapsed.append(event.elapsed)
        if bar is not None:
            bar(event)
        if save is not None:
            save(event)

    try:
        run.run(callback=on_step)
    finally:
        if bar is not None:
            bar.close()
    return [b - a for a, b in zip(elapsed, elapsed[1:])]
