"""Stages of a request and the sizing of expert-stage groups.

A request runs as a chain of stages: ``encode`` (text, and image for I2V/TI2V, plus the initial
noise), the denoise steps of each expert in schedule order (``high_noise`` then ``low_noise`` for
the A14B MoE models, ``dense`` for TI2V-5B) and ``decode`` (VAE). An executor may run all stages
on one worker group (*fused*) or place the two experts on separate groups (*staged*), so that one
request's low-noise steps overlap the next request's high-noise steps.

Staged throughput is set by the slower stage, so the devices are split so that the two stages take
about the same time: T2V-A14B at 40 steps / shift 12 runs 26 high-noise and 14 low-noise steps,
I2V-A14B at shift 5 runs 15 and 25. :func:`propose_split` picks the split and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.engine.experts import DENSE, HIGH, LOW

ENCODE = "encode"
DECODE = "decode"
#: Every stage name, in pipeline order.
STAGE_ORDER = (ENCODE, HIGH, DENSE, LOW, DECODE)


@dataclass(frozen=True)
class Segment:
    """A run of consecutive denoise steps on one expert: steps ``[start, end)``."""

    expert: str
    start: int
    end: int

    @property
    def num_steps(self) -> int:
        """Steps in the segment."""
        return self.end - self.start


def segments(experts: Sequence[str]) -> list[Segment]:
    """Splits a per-step expert schedule into consecutive same-expert segments."""
    out: list[Segment] = []
    for index, expert in enumerate(experts):
        if out and out[-1].expert == expert:
            out[-1] = Segment(expert, out[-1].start, index + 1)
        else:
            out.append(Segment(expert, index, index + 1))
    return out


def expert_step_counts(steps: int, shift: float, boundary: float | None, *, info=None,
                       family: str = "wan2.2", solver: str | None = None,
                       timesteps=None) -> dict[str, int]:
    """Steps each expert runs, from the same schedule the workers compute.

    Args:
        steps: Denoising steps.
        shift: Flow shift (T2V-A14B 12, I2V-A14B and TI2V-5B 5).
        boundary: Boundary ratio of the MoE model, ``None`` for a dense one.
        info: The model folder's :class:`~engine.model_info.ModelInfo` (its own scheduler
            config); ``None`` prices a catalog model with ``family``'s reference scheduler.
        family: The model family when ``info`` is not given.
        solver, timesteps: The request's solver and explicit schedule (``None``: the folder's
            solver at its own spacing).

    Returns:
        ``{"high_noise": n, "low_noise": m}`` for MoE models, ``{"dense": steps}`` otherwise.
    """
    from relay.engine.models import get_spec

    spec = info.spec if info is not None else get_spec(family)
    schedule = spec.expert_schedule(info, steps, shift, boundary, solver=solver, timesteps=timesteps)
    names = (HIGH, LOW) if boundary is not None else (DENSE,)
    return {name: schedule.count(name) for name in names}


@dataclass(frozen=True, kw_only=True)
class StageSplit:
    """Devices per expert stage and why.

    Attributes:
        high_devices: Devices of the high-noise group.
        low_devices: Devices of the low-noise group.
        high_s: Predicted seconds of one request's high-noise stage on its group.
        low_s: Predicted seconds of one request's low-noise stage on its group.
        reason: One human sentence explaining the choice.
    """

    high_devices: int
    low_devices: int
    high_s: float
    low_s: float
    reason: str

    @property
    def period_s(self) -> float:
        """Seconds between finished requests when the stages overlap (the slower stage)."""
        return max(self.high_s, self.low_s)

    @property
    def balance(self) -> float:
        """Faster stage time over slower stage time (1.0 = perfectly balanced)."""
        return min(self.high_s, self.low_s) / self.period_s if self.period_s > 0 else 1.0

    def as_flag(self) -> str:
        """The ``--stage-split`` value of this split."""
        return f"{self.high_devices}:{self.low_devices}"


def ideal_step_time(devices: int) -> float:
    """Seconds per step of a group of ``devices`` relative to one device, with perfect scaling."""
    return 1.0 / devices


def propose_split(num_devices: int, high_steps: int, low_steps: int, *,
                  step_time: Callable[[int], float] = ideal_step_time,
                  allowed: Callable[[int], bool] = lambda n: True) -> StageSplit:
    """Splits ``num_devices`` into a high-noise and a low-noise group with balanced stage times.

    Args:
        num_devices: Devices to split (at least 2).
        high_steps: Steps the high-noise expert runs per request.
        low_steps: Steps the low-noise expert runs per request.
        step_time: Seconds per step of one group as a function of its device count (the layout
            planner passes its cost model; the default assumes perfect scaling).
        allowed: Which group sizes are possible (e.g. sequence-parallel degrees dividing the
            attention heads).

    Returns:
        The split minimising the slower stage's time (ties: the more balanced split).

    Raises:
        ValueError: fewer than two devices, or no allowed split.
    """
    if num_devices < 2:
        raise ValueError(f"a staged split needs at least 2 devices, got {num_devices}")
    if high_steps < 0 or low_steps < 0 or high_steps + low_steps == 0:
        raise ValueError(f"step counts must be non-negative and not both zero, got {high_steps}, {low_steps}")
    best = None
    for high in range(1, num_devices):
        low = num_devices - high
        if not (allowed(high) and allowed(low)):
            continue
        high_s, low_s = high_steps * step_time(high), low_steps * step_time(low)
        key = (max(high_s, low_s), -min(high_s, low_s))
        if best is None or key < best[0]:
            best = (key, high, low, high_s, low_s)
    if best is None:
        raise ValueError(f"no allowed split of {num_devices} devices into two groups")
    _, high, low, high_s, low_s = best
    slower = "high-noise" if high_s >= low_s else "low-noise"
    reason = (f"{high_steps} high-noise vs {low_steps} low-noise steps per request: {high}:{low} devices "
              f"gives stage times {high_s:.3g} vs {low_s:.3g} (balance {min(high_s, low_s) / max(high_s, low_s, 1e-12):.0%}); "
              f"the {slower} stage sets the pace")
    return StageSplit(high_devices=high, low_devices=low, high_s=high_s, low_s=low_s, reason=reason)


def request_experts(info, request) -> list[str]:
    """The expert of each step of ``request`` on the model ``info`` (from configs, on the CPU).

    Args:
        info: :class:`engine.model_info.ModelInfo`.
        request: A :class:`engine.request.ResolvedRequest`.
    """
    return info.spec.expert_schedule(info, request.steps, request.shift, request.boundary,
                                     solver=request.solver, timesteps=request.timesteps)
