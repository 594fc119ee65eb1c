"""CFG-parallel: the conditional forward on one half of the group, the unconditional on the
other, noise predictions exchanged, and guidance applied identically on both halves
(:class:`CfgParallelPredictor`, Wan); for a family whose guidance runs more branches (LTX-2's
four), :class:`CfgParallelBranches` splits them over the two halves."""

from __future__ import annotations

import torch
import torch.distributed as dist

from relay.parallel.groups import all_gather_stacked


class CfgParallelPredictor:
    """A drop-in for :func:`engine.denoise.guided_prediction` on a 2-way CFG group.

    Args:
        group: The CFG process group (2 ranks).
        cfg_rank: 0 runs the conditional forward, 1 the unconditional one.
    """

    def __init__(self, group, cfg_rank: int) -> None:
        if dist.get_world_size(group) != 2:
            raise ValueError("CFG-parallel needs a group of exactly 2 ranks")
        self.group = group
        self.cfg_rank = cfg_rank

    def __call__(self, model, x: torch.Tensor, timestep: torch.Tensor, cond,
                 guidance: float, *, branch=None, step=None) -> tuple[torch.Tensor, int]:
        """The guided noise prediction and the request's forwards (2: one per half; 1 when the
        step has no unconditional forward and both halves run the same conditional one).
        ``branch(name)`` is the cache context of a forward (:func:`engine.denoise.forward`)."""
        from relay.engine.denoise import forward

        kwargs = {} if branch is None else {"branch": branch}
        if guidance <= 1.0 or cond.negative_embeds is None:
            # No unconditional forward on this step: both halves run the conditional one, so
            # every rank still executes the same sequence of forwards (FSDP stays in step).
            return forward(model, x, timestep, cond.prompt_embeds, name="cond", **kwargs), 1
        if self.cfg_rank == 0:
            mine = forward(model, x, timestep, cond.prompt_embeds, name="cond", **kwargs)
        else:
            mine = forward(model, x, timestep, cond.negative_embeds, name="uncond", **kwargs)
        noise, uncond = all_gather_stacked(mine, self.group)
        return uncond + guidance * (noise - uncond), 2


class CfgParallelBranches:
    """Runs a step's branch forwards over a 2-way CFG group: branch ``i`` on half ``i % 2``,
    outputs exchanged, so both halves get every output (the runner of
    :meth:`engine.denoise.StepContext.run_branches`).

    With an odd number of branches the second half runs its last branch once more and drops it,
    so both halves run the same number of forwards (FSDP's and the sequence group's collectives
    stay in step). Each branch returns a tensor or a tuple of tensors of the same shapes on
    every branch.

    Args:
        group: The CFG process group (2 ranks).
        cfg_rank: This rank's half (0 or 1).
    """

    def __init__(self, group, cfg_rank: int) -> None:
        if dist.get_world_size(group) != 2:
            raise ValueError("CFG-parallel needs a group of exactly 2 ranks")
        self.group = group
        self.cfg_rank = cfg_rank

    def __call__(self, model, calls) -> list:
        n = len(calls)
        mine = list(range(self.cfg_rank, n, 2))
        rounds = (n + 1) // 2
        if not mine:  # one branch: both halves run it (and agree)
            return [calls[0][1]()]
        outputs = [calls[i][1]() for i in mine]
        while len(outputs) < rounds:  # even out the forwards (the extra is dropped)
            outputs.append(calls[mine[-1]][1]())
        single = torch.is_tensor(outputs[0])
        parts = [outputs] if single else list(zip(*outputs))  # per output tensor: its rounds
        gathered = [all_gather_stacked(torch.stack(list(part)), self.group) for part in parts]  # (2, rounds, ...)
        result = []
        for i in range(n):
            items = [g[i % 2, i // 2] for g in gathered]
            result.append(items[0] if single else tuple(items))
        return result
