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

from relay.parallel.groups import RankInfo
from relay.parallel.layout import ParallelLayout

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


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What one worker group loads and how it is laid out (picklable; the same on every rank).

    Attributes:
        model: Model directory.
        layout: The parallel layout of the group.
        roles: Stages this group runs (:data:`engine.stages.STAGE_ORDER` names); the experts it
            loads are the expert stages among them. ``None`` = every stage (fused).
        dtype: ``bf16`` / ``fp16`` / ``fp32`` or ``None`` for the device default.
        device_type: ``cuda`` or ``cpu``.
        text_encoder: ``device``, ``cpu`` or ``fsdp`` (see :class:`GenerateJob`).
        offload: FSDP2 CPU offload of the shards (or, on one rank, model offload).
        timeout_s: Collective timeout of the group.
        threads: CPU threads per rank (default: the cores divided among the group's ranks;
            an executor running several groups at once divides them among all its ranks).
    """

    model: str
    layout: ParallelLayout
    roles: tuple[str, ...] | None = None
    dtype: str | None = None
    device_type: str = "cpu"
    text_encoder: str = "device"
    offload: bool = False
    timeout_s: float = 600.0
    threads: int | None = None


class StageWorker:
    """One rank of a worker group: joins the group, loads what its roles need, and runs stages.

    Every launcher (torchrun, the local spawner, Ray actors) builds one per rank from rank
    information and calls the same methods on every rank of a group in the same order
    (lock-step); only the output rank (global rank 0) returns states, previews and frames.

    Args:
        info: Rank information from the launcher.
        spec: What to load and the layout.
    """

    def __init__(self, info: RankInfo, spec: WorkerSpec) -> None:
        from relay.engine.model_info import read_model_info
        from relay.engine.pipeline import Engine
        from relay.parallel import parallelize
        from relay.parallel.cfg import CfgParallelPredictor
        from relay.parallel.groups import init_groups

        from relay.launch.cli import quiet_libraries

        quiet_libraries()
        if spec.device_type == "cpu":
            torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // info.world_size))
        self.info, self.spec = info, spec
        self.model_info = read_model_info(spec.model)
        self.groups = init_groups(spec.layout, info, device_type=spec.device_type, timeout_s=spec.timeout_s)
        self.model = _load(spec, self.groups, self.model_info)
        self._handles = [parallelize(expert, self.groups) for expert in self.model.experts.values()]
        self.engine = Engine(self.model)
        groups = self.groups
        self._predict = CfgParallelPredictor(groups.cfg_group, groups.cfg_rank) if groups.cfg_group else None
        self._previewer = None
        self._prepared = None
        self.run = None

    @property
    def is_output_rank(self) -> bool:
        """Whether this rank returns states, previews and frames (global rank 0)."""
        return self.groups.is_output_rank

    def parameter_bytes(self) -> dict[str, int]:
        """This rank's parameter bytes of each loaded expert (shards under FSDP)."""
        from relay.parallel.fsdp import local_parameter_bytes

        return {name: local_parameter_bytes(expert) for name, expert in self.model.experts.items()}

    def prepare(self, request: dict):
        """The ``encode`` stage: text (and image) conditioning and the initial noise.

        Args:
            request: ``ResolvedRequest.to_dict(with_image=True)``, identical on every rank.

        Returns:
            The :class:`~engine.state.DenoiseState` before step 0 (output rank; ``None`` elsewhere).
        """
        from relay.engine.request import ResolvedRequest

        self._prepared = self.engine.prepare(ResolvedRequest(**request))
        return self._prepared.to_cpu() if self.is_output_rank else None

    def begin(self, state=None) -> None:
        """Starts denoising ``state`` (a fresh state, a hand-off or a checkpoint) on this group.

        ``None`` continues with what this group holds: the state it just prepared (no round
        trip of the conditioning through the driver) or, if none, its current run (the next
        expert's segment of a fused group).
        """
        if state is None:
            state, self._prepared = self._prepared, None
            if state is None:
                if self.run is None:
                    raise RuntimeError("begin(None) with nothing prepared and no run")
                return
        self.run = self.engine.start(state, predict=self._predict)

    @property
    def request(self) -> dict | None:
        """The request this worker is preparing or running, if any."""
        held = self._prepared if self._prepared is not None else self.run
        return None if held is None else held.request

    def advance(self, *, until: int, max_steps: int, snapshot: bool = True, preview: bool = False):
        """Runs at most ``max_steps`` steps, stopping before step index ``until``.

        Returns:
            ``(events, progress, preview)`` on the output rank: the step events, the run's
            :meth:`~engine.denoise.DenoiseRun.progress` after the last step (when ``snapshot``;
            ``DenoiseState.advanced`` makes it a full checkpoint) and a preview PNG of the
            latents (when ``preview``); ``([], None, None)`` elsewhere.
        """
        if self.run is None:
            raise RuntimeError("advance() before begin()")
        events = []
        end = min(until, self.run.step_index + max_steps)
        self.run.run(until=end, callback=events.append)
        if not self.is_output_rank:
            return [], None, None
        progress = self.run.progress() if snapshot else None
        png = self.preview_png(self.run.latents) if preview else None
        return events, progress, png

    def preview_png(self, latents) -> bytes:
        """A small PNG of ``latents`` through the VAE's linear latent-to-RGB projection."""
        if self._previewer is None:
            from relay.engine.preview import LatentPreviewer

            self._previewer = LatentPreviewer.for_vae(self.model.vae)
        return self._previewer.png(latents)

    def decode(self, state=None):
        """The ``decode`` stage: frames ``(F, H, W, 3)`` of ``state`` (default: the current run)
        on the output rank, ``None`` elsewhere (other ranks have nothing to do)."""
        if not self.is_output_rank:
            return None
        return self.engine.decode(state if state is not None else self.run)

    def close(self) -> None:
        """Removes the parallel hooks and leaves the process group."""
        from relay.parallel.groups import destroy_groups

        for handle in self._handles:
            if handle is not None:
                handle.remove()
        self._handles = []
        destroy_groups()


def _load(spec: WorkerSpec, groups, info):
    """Loads the model for this rank: the experts of its roles (FSDP-sharded when the layout
    asks for it), the text encoder when it encodes, and the VAE (decode, image encode, previews)."""
    from relay.engine.loader import DTYPES, default_dtype, expert_folders, load_model
    from relay.engine.stages import ENCODE

    device = groups.device
    dtype_name = spec.dtype or default_dtype(device)
    folders = expert_folders(info)
    wanted = tuple(folders) if spec.roles is None else tuple(n for n in folders if n in spec.roles)
    encodes = spec.roles is None or ENCODE in spec.roles
    sharded = groups.fsdp_mesh is not None
    model = load_model(info, dtype=dtype_name, device=device, experts=() if sharded else wanted,
                       text_encoder=encodes and spec.text_encoder == "device",
                       offload=spec.offload and groups.layout.world_size == 1)
    torch_dtype = DTYPES[dtype_name]
    if sharded:
        from relay.parallel.fsdp import load_sharded_transformer

        for name in wanted:
            model.experts[name] = load_sharded_transformer(
                info.path, folders[name], mesh=groups.fsdp_mesh, device=device, dtype=torch_dtype,
                offload=spec.offload)
    if not encodes:
        return model
    if spec.text_encoder == "fsdp" and groups.world_mesh is not None:
        from relay.parallel.fsdp import load_sharded_text_encoder

        model.text_encoder = load_sharded_text_encoder(
            info.path / "text_encoder", mesh=groups.world_mesh, device=device, dtype=torch_dtype,
            offload=spec.offload)
    elif spec.text_encoder != "device":
        from relay.engine.loader import load_text_encoder

        model.text_encoder = load_text_encoder(
            info, dtype=torch_dtype, device=torch.device("cpu") if spec.text_encoder == "cpu" else device)
    return model


def run_generation(info: RankInfo, job: GenerateJob) -> dict:
    """Joins the group, generates, and (on rank 0) writes the output.

    Returns:
        A small report: rank, per-rank parameter bytes of each expert, timings.
    """
    import torch.distributed as dist

    started = time.perf_counter()
    spec = WorkerSpec(model=job.model, layout=job.layout, dtype=job.dtype, device_type=job.device_type,
                      text_encoder=job.text_encoder, offload=job.offload)
    worker = StageWorker(info, spec)
    try:
        shared = [job.request]
        dist.broadcast_object_list(shared, src=0)  # every rank uses rank 0's request (and seed)
        worker.prepare(shared[0])
        worker.begin()  # continues from the state it just prepared
        loaded = time.perf_counter() - started
        step_s = _denoise(worker.run, job, worker.is_output_rank)
        if worker.is_output_rank:
            from relay.engine.video import write_output

            write_output(worker.decode(), job.output, fps=worker.run.request["fps"])
            if not job.quiet:
                print(f"wrote {job.output}", file=sys.stderr, flush=True)
        dist.barrier()
        return {"rank": info.rank, "param_bytes": worker.parameter_bytes(), "load_s": loaded,
                "step_s": step_s, "total_s": time.perf_counter() - started}
    finally:
        worker.close()


def _denoise(run, job: GenerateJob, reporting: bool) -> list[float]:
    """Runs every step; returns each step's wall time in seconds."""
    from relay.launch.progress import StepProgress, checkpoint_writer

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
