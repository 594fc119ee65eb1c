"""How one denoise step runs on many devices: process groups (:mod:`parallel.groups`),
Ulysses / ring attention through xDiT (:mod:`parallel.sequence`, :mod:`parallel.xdit`),
CFG-parallel (:mod:`parallel.cfg`) and FSDP2 sharding (:mod:`parallel.fsdp`), applied to an
already built model by :func:`parallelize`. Models never import torch.distributed.
"""

from __future__ import annotations

from relay.parallel.layout import LayoutError, ParallelLayout

__all__ = ["LayoutError", "ParallelLayout", "parallelize"]


def parallelize(model, groups):
    """Installs sequence parallelism on a Wan transformer for ``groups``; returns the handle
    (``.remove()`` undoes it), or ``None`` when the sequence-parallel degree is 1.

    FSDP2 sharding happens at load time (:func:`parallel.fsdp.load_sharded_transformer`), so
    that no rank ever materialises a full expert; this function works on sharded and
    unsharded models alike.
    """
    if groups.sp_group is None:
        return None
    from relay.parallel.sequence import SequenceParallel

    return SequenceParallel(model, group=groups.sp_group, rank=groups.sp_rank, device=groups.device)
