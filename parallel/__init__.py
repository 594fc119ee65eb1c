"""How one denoise step runs on many devices: process groups (:mod:`parallel.groups`),
Ulysses / ring attention through xDiT (:mod:`parallel.sequence`, :mod:`parallel.xdit`),
CFG-parallel (:mod:`parallel.cfg`) and FSDP2 sharding (:mod:`parallel.fsdp`), applied to an
already built model by :func:`parallelize`; the layout planner (:mod:`parallel.plan`,
:mod:`parallel.cost`). Models never import torch.distributed. Importing this package imports
nothing heavy.
"""

from __future__ import annotations

__all__ = ["LayoutError", "ParallelLayout", "parallelize"]


def __getattr__(name: str):
    if name in ("LayoutError", "ParallelLayout"):
        from relay.parallel import layout

        return getattr(layout, name)
    raise AttributeError(f"module 'relay.parallel' has no attribute {name!r}")


def parallelize(model, groups, plan):
    """Installs sequence parallelism on a transformer for ``groups``; returns the handle
    (``.remove()`` undoes it), or ``None`` when the sequence-parallel degree is 1.

    Args:
        model: The transformer (plain or FSDP-sharded).
        groups: This rank's :class:`~parallel.groups.ParallelGroups`.
        plan: The family's :class:`~engine.models.spec.SequenceParallelPlan` (its spec's
            ``sequence_parallel()``): where tokens are split and gathered, and the attention
            modules that get the group's kernel.

    FSDP2 sharding happens at load time (:func:`parallel.fsdp.load_sharded`), so that no rank
    ever materialises a full expert; this function works on sharded and unsharded models alike.
    """
    if groups.sp_group is None:
        return None
    from relay.parallel.sequence import SequenceParallel

    return SequenceParallel(model, plan, group=groups.sp_group, rank=groups.sp_rank, device=groups.device)
