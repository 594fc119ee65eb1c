"""The per-rank worker every executor builds: rank information in, stages out.

In-process, local-process, torchrun and Ray groups all reduce to one
:class:`~parallel.groups.RankInfo` per rank and build a :class:`StageWorker` from it and a
:class:`WorkerSpec` (what to load, the layout). The driver then calls the same methods on every
rank of a group in the same order (lock-step) through :meth:`StageWorker.execute`; only the
output rank (global rank 0) returns states, previews and frames. Control messages are small
(method names, requests, step counts); tensors travel on the executor's data plane.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, replace

import torch

from relay.engine.errors import OutOfMemory
from relay.parallel.groups import RankInfo
from relay.parallel.layout import ParallelLayout

TEXT_ENCODER_PLACEMENTS = ("device", "cpu", "fsdp")
#: The methods a driver may call through :meth:`StageWorker.execute`.
METHODS = ("prepare", "begin", "advance", "decode", "memory", "ping", "parameter_bytes", "attention_kernel")
#: Fault actions for resilience tests (see :meth:`StageWorker.execute`).
FAULT_ACTIONS = ("exit", "hang", "raise", "oom")
#: What the ``oom`` fault asks the rank's allocator for: more than any device or host has.
OOM_FAULT_BYTES = 1 << 60


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory: CUDA's ``torch.OutOfMemoryError``,
    Python's ``MemoryError``, or the CPU allocator's "can't allocate memory"."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


class PeakMemory:
    """Peak memory of a block of work on ``device``, above what was in use when it began.

    On CUDA the allocator's own peak (``max_memory_allocated``, reset at the start); on a CPU the
    process's resident set sampled every millisecond by a thread (the kernel keeps no resettable
    peak). ``bytes`` and ``measure`` are set on exit.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.previous_peak = 0
        self.measure = "cuda_max_allocated" if device.type == "cuda" else "host_rss_sampled"

    def __enter__(self) -> PeakMemory:
        import threading

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.previous_peak = torch.cuda.max_memory_allocated(self.device)  # what the reset forgets
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._peak = _rss()
        self._done = threading.Event()

        def sample():
            while not self._done.wait(0.001):
                self._peak = max(self._peak, _rss())

        self._thread = threading.Thread(target=sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        self._done.set()
        self._thread.join()
        self.bytes = int(max(self._peak, _rss()) - self._base)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_in_use(device: torch.device) -> tuple[int | None, int | None]:
    """``(bytes in use, total bytes)`` of ``device`` (the host for a CPU), ``None`` if unknown."""
    try:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            return total - free, total
        fields = {}
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, value = line.partition(":")
                fields[name] = int(value.split()[0]) * 1024
        return fields["MemTotal"] - fields["MemAvailable"], fields["MemTotal"]
    except Exception:  # noqa: BLE001 - a figure for a message, never a failure
        return None, None


def _out_of_memory(exc: BaseException, *, rank: int, device: torch.device, method: str) -> OutOfMemory:
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    detail = lines[0]
    if "enforce fail" in detail and "DefaultCPUAllocator" in detail:  # drop the C++ assertion prefix
        detail = detail[detail.index("DefaultCPUAllocator"):]
    in_use, total = memory_in_use(device)
    return OutOfMemory(rank, str(device), method, detail[:300], in_use, total)


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
        text_encoder: ``device`` (a copy per rank), ``cpu`` (run on the host) or ``fsdp``
            (sharded over every rank).
        offload: FSDP2 CPU offload of the shards (or, on one rank, model offload: the text
            encoder and the idle expert rest in host memory).
        timeout_s: Collective timeout of the group's steps.
        load_timeout_s: Collective timeout while the ranks load (a rank that loads slower than
            its peers must not abort them at their first collective); the step timeout
            applies once every rank has loaded.
        vae_parallel: Split VAE decode and image encode by rows over the group's ranks
            (:mod:`parallel.vae`; exact); off: the output rank decodes whole frames.
        vae_tiling: diffusers' tiled VAE (bounded memory on one GPU; overlapping tiles are
            blended, so the output differs slightly from the untiled decode).
        threads: CPU threads per rank (default: the cores divided among the group's ranks;
            an executor running several groups at once divides them among all its ranks).
        attention: The attention kernel (``--attention``): ``auto`` lets
            :func:`parallel.kernels.choose` pick one per GPU architecture, a
            :data:`parallel.kernels.KERNELS` name uses that one, ``sdpa`` keeps a rank that does
            not split the sequence on the library's own attention; ``None``: the rank's
            ``$RELAY_ATTENTION``, else ``auto`` (the CLI and the executor resolve the variable
            on the driver, :meth:`with_attention_named`, so Ray actors on other nodes get the
            same).
        setup_fault: Resilience tests only (``None`` in use): ``{"action": "oom", "rank": R}``
            makes rank R's allocator fail while it loads; ``{"action": "slow", "rank": R,
            "seconds": S}`` makes it load S seconds later than its peers.
    """

    model: str
    layout: ParallelLayout
    roles: tuple[str, ...] | None = None
    dtype: str | None = None
    device_type: str = "cpu"
    text_encoder: str = "device"
    offload: bool = False
    timeout_s: float = 600.0
    load_timeout_s: float = 1800.0
    vae_parallel: bool = False
    vae_tiling: bool = False
    threads: int | None = None
    attention: str | None = None
    setup_fault: dict | None = None

    def with_attention_named(self) -> WorkerSpec:
        """This spec with :attr:`attention` named: when it names nothing, ``$RELAY_ATTENTION``
        as this process (the driver) sees it, else ``auto`` -- so that every rank, on any node,
        is told the same (the executor calls this before building its groups)."""
        if self.attention is not None:
            return self
        from relay.parallel import kernels

        return replace(self, attention=kernels.requested(None) or kernels.AUTO)


class StageWorker:
    """One rank of a worker group: joins the group, loads what its roles need, and runs stages.

    Args:
        info: Rank information from the executor.
        spec: What to load and the layout.
    """

    def __init__(self, info: RankInfo, spec: WorkerSpec) -> None:
        from relay.engine.loader import quiet_libraries
        from relay.engine.model_info import read_model_info
        from relay.engine.pipeline import Engine
        from relay.parallel import parallelize
        from relay.parallel.cfg import CfgParallelPredictor
        from relay.parallel.groups import init_groups

        from relay.engine.logs import configure_from_env

        configure_from_env()  # JSON lines in a rank process when the server logs them
        quiet_libraries()
        if spec.vae_parallel and spec.vae_tiling:  # bands would tile by their own heights: ranks diverge
            raise ValueError("vae_parallel and vae_tiling cannot be combined")
        # One GPU's worker needs few host threads (the GPU computes); eight of them taking every
        # core each would oversubscribe the host. A CPU rank computes with its share.
        torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // info.world_size))
        self.info, self.spec = info, spec
        self.model_info = read_model_info(spec.model)
        self.groups = init_groups(spec.layout, info, device_type=spec.device_type, timeout_s=spec.timeout_s,
                                  load_timeout_s=spec.load_timeout_s)
        try:
            fault = spec.setup_fault if (spec.setup_fault or {}).get("rank", 0) == info.rank else None
            if fault and fault.get("action") == "oom":
                torch.empty(OOM_FAULT_BYTES, dtype=torch.uint8, device=self.groups.device)
            if fault and fault.get("action") == "slow":
                time.sleep(float(fault["seconds"]))
            self.model = _load(spec, self.groups, self.model_info)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self.model = None
            gc.collect()
            raise _out_of_memory(exc, rank=info.rank, device=self.groups.device, method="setup") from None
        self._handles = self._install_attention(parallelize)
        self.groups.ready()  # every rank has loaded: the step timeout from here on
        groups = self.groups
        vote = None
        if groups.layout.world_size > 1:  # cache decisions are taken once for the whole group
            from relay.parallel.caches import GroupVote

            split = groups.sp_group is not None
            sequence = dict(zip(self.model.experts, self._handles)) if split else {}
            vote = lambda expert: GroupVote(groups, sequence=sequence.get(expert))  # noqa: E731
        self.engine = Engine(self.model, vote=vote, branches=2 if groups.cfg_group is not None else 1)
        if spec.vae_tiling and self.model.vae is not None:
            self.model.vae.enable_tiling()
        if spec.vae_parallel and groups.layout.world_size > 1:
            import torch.distributed as dist

            from relay.parallel.vae import RowSplitVAE

            self.engine.family.vae_split = RowSplitVAE(self.model.vae, dist.group.WORLD)
        self._predict = self._runner = None
        if groups.cfg_group is not None:
            if hasattr(self.engine.family, "predict"):  # the family's own guidance: split its branches
                from relay.parallel.cfg import CfgParallelBranches

                self._runner = CfgParallelBranches(groups.cfg_group, groups.cfg_rank)
            else:
                self._predict = CfgParallelPredictor(groups.cfg_group, groups.cfg_rank)
        self._previewer = None
        self._prepared = None
        self._fault: dict | None = None
        self._released = False  # set by an out-of-memory error until the next prepare/begin
        self._peak_kept = 0  # the CUDA peak before a decode's measurement reset it
        self.run = None

    def _install_attention(self, parallelize) -> list:
        """Each expert's attention (:func:`parallel.parallelize`); decides and records the kernel
        (:attr:`kernel`) before any request, so a kernel that fails its check fails the load."""
        from relay.engine.loader import DTYPES, default_dtype
        from relay.parallel import kernels

        spec, groups = self.spec, self.groups
        dtype = DTYPES[spec.dtype or default_dtype(groups.device)]
        head_dim = self.model_info.transformer_config.get("attention_head_dim")
        plan = self.model_info.spec.sequence_parallel()
        # Resolved once (``$RELAY_ATTENTION`` when the spec names nothing), the same for every path.
        attention = kernels.requested(spec.attention) or kernels.AUTO
        handles = [parallelize(expert, groups, plan, attention=attention, dtype=dtype, head_dim=head_dim)
                   for expert in self.model.experts.values()]
        if groups.sp_group is not None:
            self.kernel = kernels.choose(groups.device, dtype, head_dim, prefer=attention).name
        else:
            local = [h for h in handles if h is not None]
            self.kernel = local[0].kernel.name if local else kernels.LIBRARY
        return handles

    def attention_kernel(self) -> str:
        """The attention kernel this rank's experts run (a :data:`parallel.kernels.KERNELS`
        name, or ``sdpa``: the library's own attention)."""
        return self.kernel

    @property
    def is_output_rank(self) -> bool:
        """Whether this rank returns states, previews and frames (global rank 0)."""
        return self.groups.is_output_rank

    # --- the control entry point ----------------------------------------------------------------
    def execute(self, method: str, args: tuple = (), fault=None):
        """Runs ``method(*args)``: every executor's rank calls this, the same way.

        Args:
            method: One of :data:`METHODS`.
            args: Its arguments.
            fault: Fault injection for resilience tests (``None``: keep the current one):
                ``{"action": "exit" | "hang" | "raise" | "oom", "method": ..., "at_step": N
                (advance only), "seed": S (only that request)}``, or ``{}`` to disarm. ``exit``
                really ends the process (``os._exit``), ``hang`` really blocks, ``oom`` really
                asks the device's allocator for more than it has.

        Raises:
            OutOfMemory: the allocator ran out of memory; the worker has dropped its run and
                its prepared state and freed the cache first, and answers the calls already
                queued behind this one (``advance``) with nothing until the next request.
        """
        if method not in METHODS:
            raise ValueError(f"unknown worker method {method!r}")
        if fault is not None:
            self._fault = fault or None
        if method in ("prepare", "begin"):
            self._released = False
        elif method == "advance" and self._released:
            return [], None, None  # a chunk queued behind the failed one: nothing to run
        try:
            self._maybe_fail(method, args)
            return getattr(self, method)(*args)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            oom = _out_of_memory(exc, rank=self.info.rank, device=self.groups.device, method=method)
            self.release()
            raise oom from None

    def release(self) -> None:
        """Drops the run and the prepared state and returns cached memory to the device (after
        an out-of-memory error; the weights stay loaded)."""
        self.run, self._prepared, self._released = None, None, True
        if getattr(self, "model", None) is not None:
            self.model.drop_prefetch()  # an expert copied in ahead holds a whole expert's memory
        gc.collect()
        if self.groups.device.type == "cuda":
            torch.cuda.empty_cache()

    def _maybe_fail(self, method: str, args: tuple) -> None:
        fault = self._fault
        if not fault or fault.get("method") != method:
            return
        step_range = None
        if method == "prepare":
            request = args[0]
        elif method in ("begin", "decode") and args and args[0] is not None:
            request = args[0].request
        else:
            request = self.request
        if method == "advance" and self.run is not None:
            until, max_steps = args[0], args[1]
            step_range = range(self.run.step_index, min(until, self.run.step_index + max_steps))
        if fault.get("seed") is not None and (request or {}).get("seed") != fault["seed"]:
            return
        at = fault.get("at_step")
        if step_range is not None and at is not None:
            if at not in step_range:
                return
            self.run.run(until=at)  # the steps before the fault really run
        if fault["action"] == "hang":
            time.sleep(10**6)
        if fault["action"] == "raise":
            raise RuntimeError(f"injected fault in {method}")
        if fault["action"] == "oom":
            torch.empty(OOM_FAULT_BYTES, dtype=torch.uint8, device=self.groups.device)
        os._exit(17)

    # --- stages ---------------------------------------------------------------------------------
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
        self.run = self.engine.start(state, predict=self._predict, runner=self._runner)

    @property
    def request(self) -> dict | None:
        """The request this worker is preparing or running, if any."""
        held = self._prepared if self._prepared is not None else self.run
        return None if held is None else held.request

    def advance(self, until: int, max_steps: int, preview: bool = False):
        """Runs at most ``max_steps`` steps, stopping before step index ``until``.

        Returns:
            ``(events, progress, preview)`` on the output rank: the step events, the run's
            :meth:`~engine.denoise.DenoiseRun.progress` after the last step
            (``DenoiseState.advanced`` makes it a full checkpoint) and a preview PNG of the
            latents (when ``preview``); ``([], None, None)`` elsewhere.
        """
        if self.run is None:
            raise RuntimeError("advance() before begin()")
        events = []
        end = min(until, self.run.step_index + max_steps)
        self.run.run(until=end, callback=events.append)
        if not self.is_output_rank:
            return [], None, None
        # A family may opt out of previews (``previews = False`` on its pipeline); none does now.
        png = (self.preview_png(self.run.latents, self.run.cond)
               if preview and getattr(self.engine.family, "previews", True) else None)
        return events, self.run.progress(), png

    def preview_png(self, latents, cond=None) -> bytes:
        """A small PNG of ``latents`` through the family's linear latent-to-RGB projection.

        ``cond`` (the run's conditioning) goes to the family's ``preview_latents`` where it has
        one (LTX-2: the video stream of the flat tokens); Wan's latents are the grid already.
        """
        from relay.engine.preview import LatentPreviewer, video_latents

        if self._previewer is None:
            self._previewer = LatentPreviewer.for_vae(self.model.vae, self.model_info.spec.preview_projection)
        return self._previewer.png(video_latents(self.engine.family, latents, cond))

    def decode(self, state=None):
        """The ``decode`` stage of ``state`` (default: the current run).

        Returns:
            On each rank that took part, ``(clip, report)``: the :class:`engine.video.Clip`
            (frames ``(F, H, W, 3)``, and sound) on the output rank (``None`` on the others) and ``{"rank", "seconds", "peak_bytes",
            "measure"}`` of this rank's decode. ``None`` on a rank that did not take part
            (without ``--vae-parallel`` only the output rank decodes).
        """
        if self.engine.family.vae_split is None and not self.is_output_rank:
            return None
        with PeakMemory(self.groups.device) as peak:
            began = time.perf_counter()
            frames = self.engine.decode_clip(state if state is not None else self.run)
            seconds = time.perf_counter() - began
        self._peak_kept = max(self._peak_kept, peak.previous_peak)  # memory() still sees the denoise peak
        return frames, {"rank": self.info.rank, "seconds": seconds, "peak_bytes": peak.bytes, "measure": peak.measure}

    def memory(self, reset: bool = True) -> dict:
        """This rank's peak memory since the previous call (``reset``) or the start.

        Returns:
            ``{"rank", "device", "peak_bytes", "measure"}``: on CUDA the peak of
            ``torch.cuda.max_memory_allocated``; on a CPU the process's peak resident set
            (the kernel keeps no resettable peak, so it is the peak since the process started).
        """
        device = self.groups.device
        if device.type == "cuda":
            peak = max(torch.cuda.max_memory_allocated(device), self._peak_kept)
            if reset:
                torch.cuda.reset_peak_memory_stats(device)
                self._peak_kept = 0
            measure = "cuda_max_allocated"
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            measure = "host_peak_rss"
        return {"rank": self.info.rank, "device": str(device), "peak_bytes": int(peak), "measure": measure}

    def ping(self) -> int:
        """This process's pid (a cheap call that proves the rank answers)."""
        return os.getpid()

    def parameter_bytes(self) -> dict[str, int]:
        """This rank's parameter bytes of each loaded expert (shards under FSDP)."""
        from relay.parallel.fsdp import local_parameter_bytes

        return {name: local_parameter_bytes(expert) for name, expert in self.model.experts.items()}

    def close(self) -> None:
        """Removes the parallel hooks and leaves the process group."""
        from relay.parallel.groups import destroy_groups

        for handle in self._handles:
            if handle is not None:
                handle.remove()
        self._handles = []
        destroy_groups(self.groups)


def _load(spec: WorkerSpec, groups, info):
    """Loads the model for this rank: the experts of its roles (FSDP-sharded when the layout
    asks for it), the text encoder when it encodes, and the VAE (decode, image encode, previews)."""
    from relay.engine.experts import DENSE, HIGH, LOW
    from relay.engine.loader import DTYPES, default_dtype, load_model
    from relay.engine.stages import ENCODE

    family = info.spec
    device = groups.device
    dtype_name = spec.dtype or default_dtype(device)
    names = (HIGH, LOW) if info.is_moe else (DENSE,)
    wanted = names if spec.roles is None else tuple(n for n in names if n in spec.roles)
    encodes = spec.roles is None or ENCODE in spec.roles
    sharded = groups.fsdp_mesh is not None
    model = load_model(info, dtype=dtype_name, device=device, experts=() if sharded else wanted,
                       text_encoder=encodes and spec.text_encoder == "device",
                       offload=spec.offload and groups.layout.world_size == 1)
    torch_dtype = DTYPES[dtype_name]
    if sharded:
        from relay.parallel.fsdp import load_sharded

        for name in wanted:
            meta, folder = family.meta_transformer(info, name)
            model.experts[name] = load_sharded(meta, folder, mesh=groups.fsdp_mesh, device=device,
                                               dtype=torch_dtype, offload=spec.offload)
    if not encodes:
        return model
    if spec.text_encoder == "fsdp" and groups.world_mesh is not None:
        from relay.parallel.fsdp import load_sharded

        meta, folder = family.meta_text_encoder(info, dtype=torch_dtype)
        model.text_encoder = load_sharded(meta, folder, mesh=groups.world_mesh, device=device,
                                          dtype=torch_dtype, offload=spec.offload)
    elif spec.text_encoder != "device":
        model.text_encoder = family.load_text_encoder(
            info, dtype=torch_dtype, device=torch.device("cpu") if spec.text_encoder == "cpu" else device)
    return model
