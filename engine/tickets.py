"""The stage scheduler's vocabulary: its policy (:class:`SchedulerConfig`), a submitted request
(:class:`Ticket`), the call trace, its errors, and the :class:`WorkerGroup` protocol that
executors implement (:mod:`engine.scheduler` runs them; :mod:`launch` provides in-process,
local-process, torchrun and Ray groups)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.engine.stages import Segment
from relay.engine.stats import RunStats


class GroupFailure(RuntimeError):
    """A worker group can no longer be used (a worker died or a call exceeded the watchdog)."""


class GroupOutOfMemory(GroupFailure):
    """A rank of the group ran out of memory. The request cannot run on this layout (the same
    request would fail the same way): the scheduler fails it at once, without a retry.

    Attributes:
        oom: The rank's :class:`~engine.errors.OutOfMemory`.
        keep: Whether the group can serve the next request as it is (a one-rank group whose
            rank freed its memory); otherwise peers may be blocked in a collective and the
            group is rebuilt.
    """

    def __init__(self, message: str, *, oom, keep: bool) -> None:
        super().__init__(message)
        self.oom, self.keep = oom, keep


class RequestFailed(RuntimeError):
    """A request could not be completed; the message says why."""


class RequestOutOfMemory(RequestFailed):
    """A request ran out of memory on its layout (not retried); the message says what may fit."""


class RequestCancelled(RuntimeError):
    """A request was cancelled before it completed."""


class WorkerGroup(Protocol):
    """What the scheduler needs from an executor's group of workers (every call is lock-step
    over the group's ranks and raises :class:`GroupFailure` when the group is broken)."""

    name: str
    roles: tuple[str, ...]

    def describe(self) -> dict:
        """``{"name", "roles", "ranks", "layout", "backend"}`` for logs and run stats."""
    def prepare(self, request: dict, *, timeout_s: float): ...
    def begin(self, state, *, timeout_s: float) -> None:
        """Starts denoising ``state``; ``None``: continue with the state the group holds (the
        one it just prepared, or its current run)."""
    def advance_chunks(self, *, until: int, chunks: list[tuple[int, bool]], timeout_s: float):
        """Runs the chunks ``(steps, preview)`` in order (stopping before step ``until``) and
        yields ``(events, progress, png)`` after each (``progress``: see
        :meth:`engine.denoise.DenoiseRun.progress`); may queue the next chunk on the workers
        before the previous result has been read."""
    def decode(self, state, *, timeout_s: float):
        """Decodes ``state`` (``None``: the group's current run); returns ``(frames, reports)``,
        one ``{"rank", "seconds", "peak_bytes", "measure"}`` per rank that took part."""
    def memory(self, *, timeout_s: float) -> list[dict]:
        """Each rank's peak memory since the previous call (see :mod:`engine.stats`)."""
    def ping(self, *, timeout_s: float) -> list:
        """Proves every rank answers (each rank's pid); the idle-group health check."""
    def restart(self) -> None: ...
    def shutdown(self) -> None: ...


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Scheduling policy.

    Attributes:
        max_queue: Requests that may wait to enter the pipeline; more are refused.
        checkpoint_every: Steps per group call; the scheduler holds a checkpoint after each.
        step_timeout_s: Watchdog: seconds a step (or encode/decode) may take before the group is
            declared hung.
        load_timeout_s: Extra seconds the first call after a (re)build may take.
        max_request_retries: Group failures one request may cause before it fails.
        max_group_restarts: Rebuilds of one group before it is retired.
        overlap: Whether a new request may enter the pipeline while others are in flight
            (``False`` is the no-overlap baseline: request i+1 waits for request i).
        health_period_s: A group idle this long is pinged (0: never); a group whose ranks do
            not all answer within ``health_timeout_s`` is rebuilt before a request finds it.
            Groups with ``health_checked = False`` (in-process, torchrun) are not pinged.
        health_timeout_s: Seconds every rank has to answer a health check.
        rebuild_retry_s: A group retired because it could not be rebuilt (its node was lost
            and no capacity was left) tries to build again this often, and serves again once
            it has built (capacity came back: a node joined). 0 retires it for good. Groups
            with ``rejoins = False`` (torchrun) are never retried. A group retired by
            ``max_group_restarts`` stays retired.
    """

    max_queue: int = 64
    checkpoint_every: int = 1
    step_timeout_s: float = 300.0
    load_timeout_s: float = 600.0
    max_request_retries: int = 2
    max_group_restarts: int = 10
    overlap: bool = True
    health_period_s: float = 30.0
    health_timeout_s: float = 10.0
    rebuild_retry_s: float = 30.0

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.max_queue < 0 or self.max_request_retries < 0 or self.max_group_restarts < 0:
            raise ValueError("max_queue, max_request_retries and max_group_restarts must be >= 0")
        if self.step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be positive, got {self.step_timeout_s}")
        if not 0 <= self.rebuild_retry_s < float("inf"):
            raise ValueError(f"rebuild_retry_s must be a number of seconds >= 0, got {self.rebuild_retry_s}")
        if self.health_period_s < 0 or self.health_timeout_s <= 0:
            raise ValueError(f"health_period_s must be >= 0 and health_timeout_s positive, got "
                             f"{self.health_period_s} and {self.health_timeout_s}")


@dataclass(frozen=True)
class TraceEntry:
    """One group call, for overlap analysis: ``kind`` is prepare, step, decode, restart or
    health (an idle group's ping)."""

    group: str
    request: int
    kind: str
    start: float
    end: float


@dataclass(eq=False, kw_only=True)
class Ticket:
    """A submitted request and its live state.

    Attributes:
        request_id: Sequential id.
        request: ``ResolvedRequest.to_dict(with_image=True)``.
        priority: Higher enters first.
        on_event: Called (on a scheduler thread) as ``on_event(kind, data)``.
        preview_every: A preview PNG every N steps (0: none).
        checkpoint_at: Step counts after which a ``checkpoint`` event carries the state.
        stats: The request's :class:`~engine.stats.RunStats`.
    """

    request_id: int
    #: The id logs carry for this request (the service's job id).
    label: str = ""
    request: dict
    priority: int = 0
    on_event: Callable[[str, dict], None] | None = None
    preview_every: int = 0
    checkpoint_at: frozenset = frozenset()
    stats: RunStats = field(default_factory=RunStats)
    stages: list = field(default_factory=list)  # remaining: ENCODE, Segment..., DECODE
    state: object = None  # the checkpoint: DenoiseState after the last completed call
    entered: bool = False  # counted as in the pipeline (the no-overlap baseline waits on it)
    submitted: float = 0.0
    attempts: int = 0
    cancelled: bool = False
    started: float | None = None
    step_seconds: list = field(default_factory=list)
    _done: threading.Event = field(default_factory=threading.Event)
    _result: object = None
    _error: BaseException | None = None

    @property
    def next_stage(self) -> str | None:
        """Name of the next stage to run (``None`` when finished)."""
        if not self.stages:
            return None
        stage = self.stages[0]
        return stage.expert if isinstance(stage, Segment) else stage

    @property
    def done(self) -> bool:
        """True once the request succeeded, failed or was cancelled."""
        return self._done.is_set()

    def clip(self, timeout: float | None = None):
        """Waits for and returns the decoded :class:`engine.video.Clip` (frames and sound).

        Raises:
            RequestFailed: the request failed. RequestCancelled: it was cancelled.
            TimeoutError: not finished within ``timeout``.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result

    def result(self, timeout: float | None = None):
        """Waits for and returns the frames ``(F, H, W, 3)`` (the picture of :meth:`clip`; same
        errors)."""
        clip = self.clip(timeout)
        return None if clip is None else clip.frames


#: Trace entries of the scheduler's upkeep of a group, not of serving a request.
UPKEEP_KINDS = ("restart", "health", "rejoin")


def busy_overlap(trace: Sequence[TraceEntry], a: str, b: str) -> float:
    """Seconds during which groups ``a`` and ``b`` were both inside a call."""
    busy = UPKEEP_KINDS
    spans_a = [(e.start, e.end) for e in trace if e.group == a and e.kind not in busy]
    spans_b = [(e.start, e.end) for e in trace if e.group == b and e.kind not in busy]
    return sum(max(0.0, min(ea, eb) - max(sa, sb)) for sa, ea in spans_a for sb, eb in spans_b)
