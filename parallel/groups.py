"""Process groups for a worker group: the one module that creates them.

:func:`init_groups` turns rank information from any launcher (torchrun, local processes, Ray)
into a ``torch.distributed`` world, a device mesh named ``(cfg, ring, ulysses)`` and the derived
groups, and hands yunchang (which xfuser's attention uses) the Ulysses and ring groups of this
mesh. A group of one rank (in this process) needs no ``torch.distributed`` at all. Nothing else
in Relay calls ``init_process_group`` or the xfuser / yunchang initialisers.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from relay.parallel.layout import MESH_DIMS, ParallelLayout


@dataclass(frozen=True, kw_only=True)
class RankInfo:
    """What a launcher knows about one worker: everything the worker needs to join its group."""

    rank: int
    local_rank: int
    world_size: int
    init_method: str = "env://"


@dataclass(kw_only=True)
class ParallelGroups:
    """The groups of one initialised worker.

    Attributes:
        layout: The validated layout.
        rank: Global rank.
        device: This rank's device.
        mesh: Device mesh with dimensions :data:`parallel.layout.MESH_DIMS` (``None`` for a
            group of one rank, which has no process group).
        cfg_group: Group along the CFG dimension (``None`` when ``cfg_degree == 1``).
        cfg_rank: 0 runs the conditional forward, 1 the unconditional one.
        sp_group: The sequence-parallel group (ring x ulysses), ``None`` when its degree is 1.
        sp_rank: This rank's position in the sequence (the token chunk it owns).
        fsdp_mesh: 1-D mesh that expert parameters are sharded over, or ``None``.
        world_mesh: 1-D mesh over every rank (for sharding the text encoder), or ``None``
            on a single rank.
    """

    layout: ParallelLayout
    rank: int
    device: torch.device
    mesh: object | None = None
    cfg_group: object | None = None
    cfg_rank: int = 0
    sp_group: object | None = None
    sp_rank: int = 0
    fsdp_mesh: object | None = None
    world_mesh: object | None = None
    timeout_s: float = 600.0

    def ready(self) -> None:
        """Ends the load phase: waits until every rank has loaded (under the load timeout the
        groups were made with), then gives every process group of this rank the step timeout.
        No-op on one rank."""
        if self.mesh is None:
            return
        dist.barrier()
        timeout = datetime.timedelta(seconds=self.timeout_s)
        for group in _process_groups():
            try:
                dist.distributed_c10d._set_pg_timeout(timeout, group)
            except (AttributeError, RuntimeError, ValueError):  # an older torch: the load timeout stays
                pass

    @property
    def is_output_rank(self) -> bool:
        """Whether this rank writes outputs and reports progress (global rank 0)."""
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """NCCL on CUDA, gloo on CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """This rank's device: ``cuda:<local_rank>``, or the CPU."""
    return torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")


def init_groups(layout: ParallelLayout, info: RankInfo, *, device_type: str | None = None,
                timeout_s: float = 600.0, load_timeout_s: float | None = None) -> ParallelGroups:
    """Joins the process group and builds the mesh and sub-groups for ``layout``.

    Args:
        layout: The parallel layout; must fill ``info.world_size`` ranks.
        info: Rank information from the launcher.
        device_type: ``cuda`` or ``cpu`` (default: cuda when available).
        timeout_s: Collective timeout of the steps; a hung peer is detected after this long.
        load_timeout_s: Collective timeout until :meth:`ParallelGroups.ready` (loading: a rank
            that loads slower than the others must not abort the group); default ``timeout_s``.
    """
    load_timeout_s = max(timeout_s, load_timeout_s or 0.0)
    layout.check_world(info.world_size)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    device = rank_device(device_type, info.local_rank)
    if info.world_size == 1:  # one rank in this process: nothing to join, nothing to split
        return ParallelGroups(layout=layout, rank=info.rank, device=device)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend_for(device_type), init_method=info.init_method, rank=info.rank,
            world_size=info.world_size, timeout=datetime.timedelta(seconds=load_timeout_s),
            device_id=device if device_type == "cuda" else None,
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, layout.mesh_shape, mesh_dim_names=MESH_DIMS)
    sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
    cfg_group = mesh["cfg"].get_group() if layout.cfg_degree > 1 else None
    world_mesh = mesh["cfg", "ring", "ulysses"]._flatten("world") if layout.world_size > 1 else None
    fsdp_mesh = None
    if layout.fsdp_degree == layout.world_size and layout.world_size > 1:
        fsdp_mesh = world_mesh
    elif layout.fsdp_degree > 1:
        fsdp_mesh = sp_mesh
    if layout.sp_degree > 1:
        _register_sequence_groups(mesh["ulysses"].get_group(), mesh["ring"].get_group())
    return ParallelGroups(
        layout=layout, rank=info.rank, device=device, mesh=mesh, cfg_group=cfg_group,
        cfg_rank=mesh.get_local_rank("cfg"),
        sp_group=sp_mesh.get_group() if layout.sp_degree > 1 else None,
        sp_rank=sp_mesh.get_local_rank(), fsdp_mesh=fsdp_mesh, world_mesh=world_mesh, timeout_s=timeout_s,
    )


def _process_groups() -> list:
    """Every process group of this process: the world and the mesh's sub-groups."""
    world = dist.distributed_c10d._world
    return [group for group in getattr(world, "pg_map", {}) if group is not None]


def _register_sequence_groups(ulysses_group, ring_group) -> None:
    """yunchang's attention reads its groups from a registry; give it this mesh's groups."""
    from relay.parallel import xdit

    registry = xdit.load().PROCESS_GROUP
    registry.ULYSSES_PG = ulysses_group
    registry.RING_PG = ring_group


def destroy_groups(groups: ParallelGroups | None = None) -> None:
    """Leaves the process group (idempotent); yunchang's registry is cleared too. A group of
    one rank (``groups.mesh`` is ``None``) joined nothing and leaves nothing."""
    from relay.parallel import xdit

    if groups is not None and groups.mesh is None:
        return
    if xdit._loaded is not None:
        xdit._loaded.PROCESS_GROUP.ULYSSES_PG = None
        xdit._loaded.PROCESS_GROUP.RING_PG = None
    if dist.is_initialized():
        dist.destroy_process_group()


def collect_released_groups() -> None:
    """Frees, now, the process groups a finished rank no longer reaches.

    :func:`destroy_groups` unregisters every group, but the model, its FSDP state and the device
    mesh hold them in reference cycles, so their C++ backends (gloo keeps two threads per group)
    would otherwise live until interpreter teardown; freed there, a gloo thread can abort the
    process (SIGABRT, "terminate called without an active exception") after its job succeeded.
    A rank's entry point calls this once its worker is out of reach, while the interpreter is
    whole.
    """
    import gc

    gc.collect()


def all_gather_stacked(tensor: torch.Tensor, group) -> torch.Tensor:
    """Gathers ``tensor`` from every rank of ``group`` into ``(group size, *tensor.shape)``."""
    size = dist.get_world_size(group)
    out = torch.empty((size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.contiguous().unsqueeze(0), group=group)
    return out
