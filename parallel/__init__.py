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


def parallelize(model, groups, plan, *, dtype, attention: str | None = None, head_dim: int | None = None):
    """Installs how a transformer's attention runs on this rank for ``groups``; returns the
    handle (``.remove()`` undoes it), or ``None`` when the library's own attention stays.

    Args:
        model: The transformer (plain or FSDP-sharded).
        groups: This rank's :class:`~parallel.groups.ParallelGroups`.
        plan: The family's :class:`~engine.models.spec.SequenceParallelPlan` (its spec's
            ``sequence_parallel()``): where tokens are split and gathered, and the attention
            modules that get the group's kernel.
        attention: ``--attention``: a :mod:`parallel.kernels` kernel name, ``auto`` or
            ``None`` (:func:`parallel.kernels.choose` decides; ``$RELAY_ATTENTION`` may name
            one), or ``sdpa`` (one rank's sequence stays on the library's attention).
        dtype: The dtype attention runs in (the load's dtype: the kernel is chosen for it).
        head_dim: The model's attention head size (for the kernel choice).

    With a sequence-parallel group: Ulysses / ring attention over it
    (:class:`~parallel.sequence.SequenceParallel`). Without one: on CUDA, or wherever a kernel
    is named, the plan's self-attention modules run the chosen kernel on the whole sequence
    (:class:`~parallel.sequence.LocalAttention`); on a CPU with nothing named, the library's
    attention stays (diffusers' processors, exactly as its pipelines run).

    FSDP2 sharding happens at load time (:func:`parallel.fsdp.load_sharded`), so that no rank
    ever materialises a full expert; this function works on sharded and unsharded models alike.
    """
    from relay.parallel import kernels

    named = kernels.requested(attention)  # the environment is read here, once
    if groups.sp_group is not None:
        from relay.parallel.sequence import SequenceParallel

        return SequenceParallel(model, plan, group=groups.sp_group, rank=groups.sp_rank, device=groups.device,
                                prefer=named or kernels.AUTO)
    if plan is None or named == kernels.LIBRARY or (named is None and groups.device.type != "cuda"):
        return None
    from relay.parallel.sequence import LocalAttention

    return LocalAttention(model, plan, kernels.choose(groups.device, dtype, head_dim, prefer=named or kernels.AUTO).kernel)
