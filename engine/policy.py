"""The stage scheduler's decisions, free of threads and clocks.

:class:`SchedulingPolicy` answers every question :class:`engine.scheduler.StageScheduler` asks
when it routes work: which stages a request runs, whether it may be admitted, which waiting
request a free group takes, how long a group keeps a request, and how a denoise segment is cut
into group calls. The threaded scheduler and the discrete-event simulator
(:mod:`parallel.simulate`, ``relay simulate``) both call this one object, so the simulator
schedules exactly as the service does; only the clock differs.

The rules:

* a request is ``encode``, one :class:`~engine.stages.Segment` per run of same-expert steps, and
  ``decode``; a resumed snapshot skips ``encode`` and the steps it has run;
* a request may wait to enter the pipeline while fewer than ``max_queue`` others wait;
* a free group takes, among the waiting requests whose next stage it serves, the one furthest
  along (in-flight work drains first), then the highest priority, then the oldest; with
  ``overlap`` off a new request enters only when nothing is in flight (the no-overlap baseline);
* a group that took a request runs every consecutive stage it serves before handing it on;
* a segment runs in calls of at most ``checkpoint_every`` steps, cut at the steps a caller wants
  a checkpoint after.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from relay.engine.stages import DECODE, ENCODE, Segment, segments
from relay.engine.tickets import SchedulerConfig


@dataclass(frozen=True)
class SchedulingPolicy:
    """The routing rules of one scheduler (see the module docstring).

    Works on anything shaped like :class:`~engine.tickets.Ticket` (``stages``, ``entered``,
    ``priority``, ``request_id``, ``next_stage``).
    """

    config: SchedulerConfig

    @staticmethod
    def stages(experts: Sequence[str], *, resume_at: int | None = None) -> list:
        """The stages of a request whose steps run ``experts`` (one name per step).

        Args:
            experts: The expert of each step.
            resume_at: The step a snapshot continues from (``None``: a fresh request, which
                starts with ``encode``).
        """
        if resume_at is None:
            return [ENCODE, *segments(list(experts)), DECODE]
        rest = [Segment(s.expert, max(s.start, resume_at), s.end) for s in segments(list(experts))
                if s.end > resume_at]
        return [*rest, DECODE]

    def admission_error(self, waiting: int) -> str | None:
        """Why a new request is refused when ``waiting`` requests wait to enter (``None``: admitted)."""
        if waiting >= self.config.max_queue:
            return f"queue full ({waiting} requests waiting)"
        return None

    @staticmethod
    def rank(ticket) -> tuple:
        """Sort key of waiting requests: in-flight work first (the later its stage, the sooner),
        then priority, then arrival."""
        progress = -len(ticket.stages) if ticket.entered else 0
        return (progress, -ticket.priority, ticket.request_id)

    def eligible(self, ticket, roles: Iterable[str], in_flight: int) -> bool:
        """Whether a group serving ``roles`` may take ``ticket`` now."""
        return ticket.next_stage in roles and (self.config.overlap or ticket.entered or in_flight == 0)

    def pick(self, waiting: Iterable, roles: Sequence[str], in_flight: int):
        """The waiting request a free group serving ``roles`` takes (``None``: none it may)."""
        candidates = [t for t in waiting if self.eligible(t, roles, in_flight)]
        return min(candidates, key=self.rank) if candidates else None

    @staticmethod
    def keeps(ticket, roles: Sequence[str]) -> bool:
        """Whether the group holding ``ticket`` runs its next stage too (it serves it)."""
        return bool(ticket.stages) and ticket.next_stage in roles

    def chunks(self, start: int, end: int, *, total: int, checkpoint_at: Iterable[int] = (),
               preview_every: int = 0) -> list[tuple[int, bool]]:
        """``(steps, preview)`` of each group call from step ``start`` to ``end``: at most
        ``checkpoint_every`` steps, ending at every step a checkpoint is wanted after; a call
        previews when one of its steps is due a preview (every ``preview_every``-th and the last
        of ``total``)."""
        wanted_at = sorted(set(checkpoint_at))
        chunks, step = [], start
        while step < end:
            count = min(self.config.checkpoint_every, end - step)
            wanted = [k for k in wanted_at if step < k < step + count]
            if wanted:
                count = wanted[0] - step
            preview = bool(preview_every) and any((s + 1) % preview_every == 0 or s + 1 == total
                                                  for s in range(step, step + count))
            chunks.append((count, preview))
            step += count
        return chunks
