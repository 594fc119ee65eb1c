"""Feature-cache decisions taken once for a whole worker group.

A first-block cache skips a forward when the first block's residual barely changed. Under
sequence parallelism each rank holds a chunk of that residual, and under CFG-parallel the two
halves run different branches; if ranks decided alone, one would skip while another computes
and the group's collectives would no longer match. :class:`GroupVote` therefore

1. sums ``|r - r_prev|`` and ``|r_prev|`` over this rank's real tokens (the padding of the last
   chunk is left out) and all-reduces the sums over the sequence-parallel group, so every rank
   of a branch compares the metric of the whole sequence -- what one process computes, up to
   summation order and precision (fp64 sums here, the model dtype's means in one process: right
   at the threshold the two may decide differently);
2. all-reduces the branches' decisions over the whole group: when any branch computes, every
   rank runs the remaining blocks (a branch that decided to skip discards them and returns its
   cached output, exactly as it would alone), so no rank ever skips while another computes.

Two small all-reduces per forward (2 numbers each); every rank calls them in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class GroupVote:
    """The first-block vote of one rank of a worker group.

    Args:
        groups: The rank's :class:`~parallel.groups.ParallelGroups`.
        sequence: The expert's :class:`~parallel.sequence.SequenceParallel` (``None`` without
            sequence parallelism): where this rank's real tokens end.
    """

    def __init__(self, groups, sequence=None) -> None:
        self.sp_group = groups.sp_group
        self.sp_rank = groups.sp_rank
        self.world = dist.group.WORLD if dist.is_initialized() else None
        self.device = groups.device
        self.sequence = sequence

    def _valid(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.sequence is None:
            return tensor
        return tensor.narrow(1, 0, self.sequence.chunk.valid)

    def decide(self, residual: torch.Tensor, previous: torch.Tensor, threshold: float) -> tuple[bool, bool, int]:
        """``(this branch computes, the group computes, skipped branches of the request)``."""
        r, p = self._valid(residual), self._valid(previous)
        sums = torch.stack([(r - p).abs().sum(dtype=torch.float64), p.abs().sum(dtype=torch.float64)]).cpu()
        if self.sp_group is not None:
            sums = _all_reduce(sums, self.sp_group, residual.device)
        want = bool(sums[0] / sums[1] > threshold) if sums[1] > 0 else True
        return self._agree(want, self.device)

    def first(self) -> tuple[bool, bool, int]:
        """A branch's first forward computes; the group still votes (every rank calls the same
        collectives in the same order)."""
        return self._agree(True, self.device)

    def _agree(self, want: bool, device: torch.device) -> tuple[bool, bool, int]:
        # Each branch is counted once: by the first rank of its sequence-parallel group.
        counted = self.sp_rank == 0
        flags = torch.tensor([float(want), float(counted and not want)], dtype=torch.float64)
        if self.world is not None:
            flags = _all_reduce(flags, self.world, device)
        return want, bool(flags[0] > 0), int(flags[1])


def _all_reduce(tensor: torch.Tensor, group, device: torch.device) -> torch.Tensor:
    """Sum over ``group``, on the device the group's backend talks (NCCL: the GPU)."""
    backend = dist.get_backend(group)
    on = tensor.to(device) if backend == "nccl" else tensor
    dist.all_reduce(on, group=group)
    return on.cpu()
