"""The stage scheduler: requests flow through worker groups stage by stage.

A request is a chain of stages (:mod:`engine.stages`): ``encode``, one segment per expert, and
``decode``. Each worker group runs the stages of its *roles*; a *fused* group has every role and
runs whole requests, a *staged* pair splits the experts so that request i's low-noise steps run
while request i+1's high-noise steps do. The scheduler:

* admits requests -- fresh, or resumed from a snapshot -- into a bounded queue (priority, then
  FIFO) and routes each to the per-stage queue of its next stage; a free group takes the most advanced waiting request it can serve
  (finishing in-flight work first), runs every consecutive stage it holds, and hands the
  :class:`~engine.state.DenoiseState` on;
* drives the denoise steps in calls of ``checkpoint_every`` steps (split at the steps a caller
  wants a ``checkpoint`` event for) and keeps the state after each call *outside the workers*
  (the checkpoint); progress, previews and the checkpoint come back from the group's output rank;
* records each request's :class:`~engine.stats.RunStats` (seconds per stage, forwards per
  expert, decode ranks, peak memory per rank, the layout);
* cancels at step boundaries (it simply stops calling the group: every rank stops in lock-step);
* treats a dead or hung worker (a :class:`GroupFailure`: the executor's watchdog or a lost
  actor) by rebuilding the whole group and re-queueing its request from the last checkpoint.
  A request that breaks its group more than ``max_request_retries`` times fails with a clear
  error; a group rebuilt more than ``max_group_restarts`` times is retired. Other requests are
  never lost. A group that cannot be rebuilt at all (its node was lost, no room is left) is
  retired too, but tries to build again every ``rebuild_retry_s`` and serves once it has;
* fails a request that runs out of memory (:class:`GroupOutOfMemory`) at once, without a
  retry (the same layout would fail again), with a message naming its size, frames and layout
  and what may fit (the executor's ``advise`` hook adds the planner's figures); the group is
  kept when its one rank freed its memory, rebuilt otherwise (peers may sit in a collective);
* pings a group that has been idle for ``health_period_s`` and rebuilds it when a rank does not
  answer within ``health_timeout_s``, so a frozen worker is replaced before a request finds it.

Every routing decision (stages, admission, which request a free group takes, how long it keeps
it, how segments are cut into calls) is :class:`engine.policy.SchedulingPolicy`'s, the same
object the discrete-event simulator (``relay simulate``) schedules with; this module adds the
threads, the clock, the group calls and the fault handling.

It never imports ray or torch.distributed: a group is anything with the :class:`WorkerGroup`
methods. Every way of running Relay -- one process, local processes, torchrun, Ray fused or
staged, the service on any of them -- is this scheduler over the groups of one executor
(:mod:`launch.executor`).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from relay.engine.logs import REQUEST_ID
from relay.engine.metrics import RECORDER, state_bytes
from relay.engine.policy import SchedulingPolicy
from relay.engine.stages import DECODE, ENCODE, Segment, segments
from relay.engine.stats import RunStats
from relay.engine.tickets import (
    GroupFailure,
    GroupOutOfMemory,
    RequestCancelled,
    RequestFailed,
    RequestOutOfMemory,
    SchedulerConfig,
    Ticket,
    TraceEntry,
    WorkerGroup,
    busy_overlap,
)

__all__ = ["GroupFailure", "GroupOutOfMemory", "RequestCancelled", "RequestFailed", "RequestOutOfMemory", "SchedulerConfig", "StageScheduler",
           "Ticket", "TraceEntry", "WorkerGroup", "busy_overlap"]

log = logging.getLogger(__name__)

#: Group calls the scheduler's trace keeps (the oldest are dropped).
TRACE_LIMIT = 100_000
#: What :meth:`StageScheduler._take` returns when an idle group is due a health check.
_HEALTH = object()
#: What it returns when a group retired for want of room is due another try at building.
_REJOIN = object()


class StageScheduler:
    """Runs requests over worker groups (see the module docstring).

    Args:
        groups: The worker groups, already built; every stage must be served by one of them.
        config: Scheduling policy.
        layout: The run stats' ``layout`` entry (default: ``{"groups": [each group's describe()]}``).
        advise: ``advise(request, group.describe(), oom) -> str``: what may fit instead, for the
            message of a request that ran out of memory (the executor's planner figures); its
            errors are logged and left out of the message.

    Attributes:
        restarts: Rebuilds per group (after a failure, an out-of-memory or a health check).
        health: Per group, ``{"checks": N, "failures": N}`` of the idle-group health checks.
    """

    def __init__(self, groups: Sequence[WorkerGroup], config: SchedulerConfig | None = None, *,
                 layout: dict | None = None,
                 advise: Callable[[dict, dict, BaseException], str] | None = None) -> None:
        self.groups = list(groups)
        self.config = config or SchedulerConfig()
        self.policy = SchedulingPolicy(self.config)
        self.layout = layout if layout is not None else {"groups": [g.describe() for g in self.groups]}
        self.advise = advise
        self.restarts = {group.name: 0 for group in self.groups}
        self.health = {group.name: {"checks": 0, "failures": 0} for group in self.groups}
        self._idle_since = {group.name: time.monotonic() for group in self.groups}
        # The newest calls (a long-running server must not grow without bound).
        self.trace: deque[TraceEntry] = deque(maxlen=TRACE_LIMIT)
        self._retired: set[str] = set()
        self._retired_why: dict[str, str] = {}  # group -> why it retired (said by the errors)
        self._retry_at: dict[str, float] = {}  # retired group -> when it next tries to build
        self._waiting: list[Ticket] = []
        self._in_flight = 0
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._closed = False
        self._epoch = time.perf_counter()
        for group in self.groups:
            RECORDER.set("relay_group_retired", 0, group=group.name)
        self._threads = [threading.Thread(target=self._serve, args=(group,), name=f"relay-{group.name}",
                                          daemon=True) for group in self.groups]
        for thread in self._threads:
            thread.start()

    # --- public API --------------------------------------------------------------------------
    def submit(self, request: dict, *, experts: Sequence[str], state=None, priority: int = 0,
               preview_every: int = 0, checkpoint_at: Sequence[int] = (),
               on_event: Callable[[str, dict], None] | None = None, label: str | None = None) -> Ticket:
        """Admits a resolved request, or a snapshot to finish.

        Args:
            request: ``ResolvedRequest.to_dict(with_image=True)`` (validated, seed fixed).
            experts: The request's expert per step (the model spec's ``expert_schedule``),
                computed on the CPU from the model config; it decides the stages.
            state: A :class:`~engine.state.DenoiseState` to continue from (a resume): the
                request skips ``encode`` and the steps the state has run.
            priority: Higher enters the pipeline first.
            preview_every: A preview PNG every N steps (0: none).
            checkpoint_at: Step counts after which a ``checkpoint`` event carries the state
                (the group calls are split there).
            on_event: ``on_event(kind, data)``, called on a scheduler thread for queued,
                started, stage, progress, preview, checkpoint, decoding, retry, done, failed,
                cancelled.
            label: The request's id in logs (the service's job id; default ``request-N``):
                every line logged while a group works on it carries it (:mod:`engine.logs`).

        Raises:
            RequestFailed: the queue is full, the scheduler is closed, or no group can serve
                one of the request's stages.
        """
        if state is not None and list(state.experts) != list(experts):
            raise RequestFailed(f"the snapshot's expert schedule {state.experts} differs from the model's {list(experts)}")
        stages = self.policy.stages(experts, resume_at=None if state is None else state.step_index)
        with self._lock:
            if self._closed:
                raise RequestFailed("the scheduler is shut down")
            refused = self.policy.admission_error(sum(1 for t in self._waiting if not t.entered))
            if refused:
                raise RequestFailed(refused)
            request_id = next(self._ids)
            ticket = Ticket(request_id=request_id, label=label or f"request-{request_id}", request=request,
                            priority=priority,
                            on_event=on_event, preview_every=preview_every, stages=stages, state=state,
                            checkpoint_at=frozenset(checkpoint_at), submitted=time.perf_counter(),
                            stats=RunStats.for_request(request, experts=experts, layout=self.layout))
            missing = [s for s in {_name(s) for s in stages} if not self._servers(s)]
            if missing:
                raise RequestFailed(self._unserved(missing))
            self._waiting.append(ticket)
            self._lock.notify_all()
        self._emit(ticket, "queued", position=self.position(ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Cancels ``ticket``: at once when waiting, at the next step boundary when running."""
        with self._lock:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._leave(ticket)
                self._finish(ticket, error=RequestCancelled(f"request {ticket.request_id} cancelled"))
            self._lock.notify_all()

    def position(self, ticket: Ticket) -> int:
        """0-based position among requests that have not entered the pipeline (-1 otherwise)."""
        with self._lock:
            fresh = sorted((t for t in self._waiting if not t.entered), key=self._rank)
            return fresh.index(ticket) if ticket in fresh else -1

    def close(self) -> None:
        """Cancels waiting requests at once and running ones at their next step boundary, and
        stops the group threads (a group is never rebuilt after this)."""
        with self._lock:
            self._closed = True
            for ticket in self._waiting:
                self._finish(ticket, error=RequestCancelled("the scheduler is shut down"))
            self._waiting.clear()
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def retired(self) -> dict[str, str]:
        """The retired groups and why each retired (one that cannot be rebuilt keeps trying,
        every ``rebuild_retry_s``, and leaves this when it serves again)."""
        with self._lock:
            return {name: self._retired_why.get(name, "") for name in self._retired}

    def wait_serving(self, name: str, timeout_s: float | None = None) -> bool:
        """Waits until group ``name`` is not retired; False on timeout, once closed, or at once
        when it is retired for good (it will not try to build again).

        Raises:
            ValueError: no group is called ``name``.
        """
        if name not in {g.name for g in self.groups}:
            raise ValueError(f"no group {name!r} (groups: {', '.join(g.name for g in self.groups)})")
        with self._lock:
            self._lock.wait_for(lambda: (self._closed or name not in self._retired
                                         or name not in self._retry_at), timeout_s)
            return not self._closed and name not in self._retired

    def unserved(self) -> str | None:
        """``None`` while every stage of the placement has a live group; else why not (which
        stages, why their groups retired, whether they try again). Health checks read this."""
        with self._lock:
            stages = {stage for group in self.groups for stage in group.roles}
            missing = [stage for stage in stages if not self._servers(stage)]
            return self._unserved(missing) if missing else None

    # --- routing -----------------------------------------------------------------------------
    def _servers(self, stage: str) -> list[WorkerGroup]:
        return [g for g in self.groups if stage in g.roles and g.name not in self._retired]

    def _unserved(self, stages) -> str:
        """The error of a request whose ``stages`` no live group runs: which, and why the groups
        that ran them retired."""
        stages = sorted(stages)
        again = (f"; it tries to build again every {self.config.rebuild_retry_s:g}s"
                 if self.config.rebuild_retry_s else "")
        why = [f"group {g.name} retired: {self._retired_why[g.name]}" + (again if g.name in self._retry_at else "")
               for g in self.groups if g.name in self._retired_why and any(s in g.roles for s in stages)]
        names = f"stage {stages[0]}" if len(stages) == 1 else f"stage(s) {stages}"
        return f"no live worker group runs {names}" + (f" ({'; '.join(why)})" if why else "")

    def _rank(self, ticket: Ticket):
        return self.policy.rank(ticket)

    def _leave(self, ticket: Ticket) -> None:
        """The ticket leaves the pipeline (call with the lock held)."""
        if ticket.entered:
            ticket.entered = False
            self._in_flight -= 1

    def _take(self, group: WorkerGroup) -> Ticket | None:
        """Blocks until a request whose next stage ``group`` serves is available (or closing);
        :data:`_HEALTH` when the group has been idle for the health period."""
        period = self.config.health_period_s if getattr(group, "health_checked", True) else 0.0
        with self._lock:
            while True:
                if self._closed:
                    return None
                if group.name in self._retired:
                    if group.name not in self._retry_at:
                        return None
                    due = self._retry_at[group.name] - time.monotonic()
                    if due <= 0:
                        return _REJOIN
                    self._lock.wait(due)
                    continue
                ticket = self.policy.pick(self._waiting, group.roles, self._in_flight)
                if ticket is not None:
                    self._waiting.remove(ticket)
                    if not ticket.entered:
                        ticket.entered = True
                        self._in_flight += 1
                    return ticket
                if not period:
                    self._lock.wait()
                    continue
                due = self._idle_since[group.name] + period - time.monotonic()
                if due <= 0:
                    return _HEALTH
                self._lock.wait(due)

    def _requeue(self, ticket: Ticket) -> None:
        with self._lock:
            if self._closed:
                self._leave(ticket)
                self._finish(ticket, error=RequestCancelled("the scheduler is shut down"))
            elif ticket.cancelled:
                self._leave(ticket)
                self._finish(ticket, error=RequestCancelled(f"request {ticket.request_id} cancelled"))
            elif not self._servers(ticket.next_stage):
                self._leave(ticket)
                self._finish(ticket, error=RequestFailed(
                    f"request {ticket.request_id}: {self._unserved([ticket.next_stage])}"))
            else:
                self._waiting.append(ticket)
            self._lock.notify_all()

    def _finish(self, ticket: Ticket, *, result=None, error: BaseException | None = None) -> None:
        ticket._result, ticket._error = result, error
        ticket.stats.retries = ticket.attempts
        ticket.stats.layout = dict(self.layout)  # the groups as they were when it finished (rebuilt ones anew)
        ticket.stats.add_seconds("total", time.perf_counter() - ticket.submitted)
        ticket._done.set()
        if error is None:
            self._emit(ticket, "done", stats=ticket.stats.to_dict())
        elif isinstance(error, RequestCancelled):
            self._emit(ticket, "cancelled", error=str(error))
        else:
            self._emit(ticket, "failed", error=str(error))

    # --- execution ---------------------------------------------------------------------------
    def _serve(self, group: WorkerGroup) -> None:
        fresh = True  # the first call after a (re)build may include loading
        while True:
            ticket = self._take(group)
            if ticket is None:
                return
            if ticket is _HEALTH:
                fresh = self._check_health(group) or fresh
                continue
            if ticket is _REJOIN:
                fresh = self._rejoin(group) or fresh
                continue
            token = REQUEST_ID.set(ticket.label)  # this thread works on the ticket: its lines carry its id
            try:
                self._run_stages(group, ticket, fresh)
                fresh = False
            except GroupOutOfMemory as exc:
                fresh = fresh or not exc.keep
                self._on_out_of_memory(group, ticket, exc)
                continue
            except GroupFailure as exc:
                fresh = True
                self._on_failure(group, ticket, exc)
                continue
            except RequestCancelled as exc:
                with self._lock:
                    self._leave(ticket)
                    self._finish(ticket, error=exc)
                    self._lock.notify_all()
                continue
            except Exception as exc:  # noqa: BLE001 - a request error must not stop the group
                log.exception("request %s failed on %s", ticket.request_id, group.name)
                with self._lock:
                    self._leave(ticket)
                    self._finish(ticket, error=RequestFailed(f"request {ticket.request_id}: {exc}"))
                    self._lock.notify_all()
                continue
            finally:
                self._idle_since[group.name] = time.monotonic()
                REQUEST_ID.reset(token)
            if ticket.stages:
                self._requeue(ticket)

    def _check_health(self, group: WorkerGroup) -> bool:
        """Pings an idle group; rebuilds it when a rank does not answer. True if rebuilt."""
        started = time.perf_counter()
        self.health[group.name]["checks"] += 1
        try:
            group.ping(timeout_s=self.config.health_timeout_s)
            failure = None
        except GroupFailure as exc:
            failure = exc
        self.trace.append(TraceEntry(group.name, -1, "health", started - self._epoch,
                                     time.perf_counter() - self._epoch))
        rebuilt = False
        if failure is not None and not self._closed:
            self.health[group.name]["failures"] += 1
            log.warning("group %s failed its health check (no answer within %.0fs: %s); rebuilding it",
                        group.name, self.config.health_timeout_s, failure)
            rebuilt = self._rebuild(group, None)
        self._idle_since[group.name] = time.monotonic()
        return rebuilt

    def _timeout(self, steps: int, fresh: bool) -> float:
        return steps * self.config.step_timeout_s + (self.config.load_timeout_s if fresh else 0.0)

    def _run_stages(self, group: WorkerGroup, ticket: Ticket, fresh: bool) -> None:
        if ticket.started is None:
            ticket.started = time.perf_counter()
            ticket.stats.add_seconds("queued", ticket.started - ticket.submitted)
            self._emit(ticket, "started", group=group.name)
        held = False  # whether the group already holds the ticket's current state
        try:
            while self.policy.keeps(ticket, group.roles):
                if ticket.cancelled or self._closed:
                    raise RequestCancelled(f"request {ticket.request_id} cancelled")
                stage = ticket.stages[0]
                self._emit(ticket, "stage", stage=ticket.next_stage, group=group.name)
                if stage == ENCODE:
                    with self._timed(group, ticket, "prepare", ENCODE):
                        state = group.prepare(ticket.request, timeout_s=self._timeout(1, fresh))
                    planned = [s.expert for s in ticket.stages if isinstance(s, Segment)]
                    if [s.expert for s in segments(state.experts)] != planned:
                        raise RequestFailed(f"request {ticket.request_id}: the workers' expert schedule "
                                            f"{state.experts} differs from the planned one")
                    ticket.state = state
                elif stage == DECODE:
                    self._emit(ticket, "decoding", group=group.name)
                    with self._timed(group, ticket, "decode", DECODE):
                        frames, reports = group.decode(None if held else ticket.state,
                                                     timeout_s=self._timeout(1, fresh))
                    ticket.stats.decode = {"group": group.name, "ranks": len(reports),
                                           "seconds": max(r["seconds"] for r in reports),
                                           "memory": [{k: r[k] for k in ("rank", "peak_bytes", "measure")}
                                                      for r in reports]}
                    ticket.stages.pop(0)
                    self._record_memory(group, ticket)
                    with self._lock:
                        self._leave(ticket)
                        self._finish(ticket, result=frames)
                        self._lock.notify_all()
                    return
                else:
                    self._denoise(group, ticket, stage, fresh, held)
                fresh, held = False, True
                ticket.stages.pop(0)
        except GroupFailure:
            raise
        except BaseException:
            self._record_memory(group, ticket, quiet=True)
            raise
        self._record_memory(group, ticket)

    def _record_memory(self, group: WorkerGroup, ticket: Ticket, *, quiet: bool = False) -> None:
        """Each rank's peak memory over this group's stages of ``ticket`` (resets the peak)."""
        try:
            ticket.stats.set_memory(group.name, group.memory(timeout_s=self._timeout(1, False)))
        except GroupFailure:
            if not quiet:
                raise

    def _chunks(self, ticket: Ticket, start: int, end: int) -> list[tuple[int, bool]]:
        """``(steps, preview)`` of each group call from step ``start`` to ``end`` (the policy's
        :meth:`~engine.policy.SchedulingPolicy.chunks`)."""
        return self.policy.chunks(start, end, total=ticket.state.num_steps, checkpoint_at=ticket.checkpoint_at,
                                  preview_every=ticket.preview_every)

    def _denoise(self, group: WorkerGroup, ticket: Ticket, segment: Segment, fresh: bool, held: bool) -> None:
        # A group that just encoded or ran the previous segment continues from what it holds;
        # another group gets the checkpoint (a hand-off).
        begun = time.perf_counter()
        state = ticket.state
        cached = (state.request.get("caches") or {}).get(segment.expert, "none") != "none"
        # A resume in the middle of a cached segment replays it from its anchor inside begin.
        replay = state.step_index - segment.start if cached and not held and state.anchor is not None else 0
        group.begin(None if held else state, timeout_s=self._timeout(1 + replay, fresh))
        if not held:
            spent = time.perf_counter() - begun
            ticket.stats.add_seconds(segment.expert if replay else "handoff", spent)
            RECORDER.inc("relay_stage_busy_seconds_total", spent, group=group.name)
            if RECORDER.active:
                RECORDER.inc("relay_handoff_bytes_total", state_bytes(state))
        chunks = self._chunks(ticket, ticket.state.step_index, segment.end)
        results = group.advance_chunks(until=segment.end, chunks=chunks,
                                       timeout_s=self._timeout(self.config.checkpoint_every, False))
        try:
            called = time.perf_counter()
            for events, progress, png in results:
                now = time.perf_counter()
                self.trace.append(TraceEntry(group.name, ticket.request_id, "step",
                                             called - self._epoch, now - self._epoch))
                ticket.stats.add_seconds(segment.expert, now - called)
                per_step = (now - called) / max(len(events), 1)
                ticket.step_seconds.append(per_step)
                RECORDER.inc("relay_stage_busy_seconds_total", now - called, group=group.name)
                called = now
                ticket.state = state = ticket.state.advanced(progress)  # the checkpoint, held here
                for event in events:
                    ticket.stats.add_step(event.expert, forwards=event.forwards, skipped=event.skipped,
                                          lockstep=event.lockstep, cache=event.cache)
                    RECORDER.observe("relay_step_seconds", per_step, group=group.name, expert=event.expert)
                    RECORDER.inc("relay_forwards_total", event.forwards, expert=event.expert, kind="computed")
                    if event.skipped:
                        RECORDER.inc("relay_forwards_total", event.skipped, expert=event.expert, kind="skipped")
                    self._progress(ticket, group, event)
                if png is not None:
                    self._emit(ticket, "preview", step=state.step_index, png=png)
                if state.step_index in ticket.checkpoint_at:
                    self._emit(ticket, "checkpoint", step=state.step_index, state=state)
                if (ticket.cancelled or self._closed) and ticket.state.step_index < segment.end:
                    raise RequestCancelled(f"request {ticket.request_id} cancelled")
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()

    def _progress(self, ticket: Ticket, group: WorkerGroup, event) -> None:
        recent = ticket.step_seconds[-8:]
        per_step = sum(recent) / len(recent)
        self._emit(ticket, "progress", step=event.step, total=event.total, expert=event.expert,
                   timestep=event.timestep, group=group.name, step_s=event.duration,
                   forwards=event.forwards, skipped=event.skipped,
                   elapsed_s=time.perf_counter() - ticket.started,
                   eta_s=per_step * (event.total - event.step))

    def _on_failure(self, group: WorkerGroup, ticket: Ticket, exc: GroupFailure) -> None:
        if self._closed:  # the groups are being torn down on purpose: no rebuild
            with self._lock:
                self._leave(ticket)
                self._finish(ticket, error=RequestCancelled("the scheduler is shut down"))
            return
        ticket.attempts += 1
        log.warning("group %s failed on request %s (attempt %d): %s", group.name, ticket.request_id,
                    ticket.attempts, exc)
        self._emit(ticket, "retry", group=group.name, attempt=ticket.attempts, error=str(exc))
        self._rebuild(group, ticket)
        if ticket.attempts > self.config.max_request_retries:
            with self._lock:
                self._leave(ticket)
                self._finish(ticket, error=RequestFailed(
                    f"request {ticket.request_id} failed: its worker group broke {ticket.attempts} times "
                    f"(last: {exc}); giving up after {self.config.max_request_retries} retries"))
                self._lock.notify_all()
            return
        self._requeue(ticket)  # a retired group's other requests were failed by _rebuild

    def _rebuild(self, group: WorkerGroup, ticket: Ticket | None) -> bool:
        """Tears ``group`` down and builds it again, or retires it after ``max_group_restarts``
        rebuilds (or when it cannot be rebuilt). True when the group is back."""
        if self._closed:  # the executor tears the groups down: nothing to rebuild for
            return False
        started = time.perf_counter()
        self.restarts[group.name] += 1
        RECORDER.inc("relay_group_restarts_total", group=group.name)
        back = False
        if self.restarts[group.name] > self.config.max_group_restarts:
            self._retire(group, f"it failed {self.restarts[group.name]} times "
                                f"(max_group_restarts {self.config.max_group_restarts})", retry=False)
            log.error("group %s retired after %d restarts", group.name, self.restarts[group.name] - 1)
            group.shutdown()
        else:
            try:
                group.restart()
                back = True
            except Exception as rebuild_error:  # noqa: BLE001 - a group that cannot rebuild retires
                log.exception("group %s could not be rebuilt", group.name)
                self._retire(group, f"rebuild failed: {rebuild_error}",
                             retry=bool(self.config.rebuild_retry_s) and getattr(group, "rejoins", False))
                if ticket is not None:
                    self._emit(ticket, "retry", group=group.name, error=f"rebuild failed: {rebuild_error}")
            else:
                self._describe_again(group)
        self.trace.append(TraceEntry(group.name, -1 if ticket is None else ticket.request_id, "restart",
                                     started - self._epoch, time.perf_counter() - self._epoch))
        if not back:
            self._fail_stranded()
        return back

    def _describe_again(self, group: WorkerGroup) -> None:
        """A rebuilt group may stand on other devices (another node, another attention kernel):
        requests that finish from now on describe it as it is now (:meth:`_finish`)."""
        described = group.describe()  # before the lock: no rank is asked (the build asked them)
        with self._lock:  # groups rebuild on their own threads: read and replace under the lock
            groups = self.layout.get("groups") or []
            self.layout = {**self.layout, "groups": [described if g.get("name") == group.name else g for g in groups]}

    def _retire(self, group: WorkerGroup, why: str, *, retry: bool) -> None:
        """Takes ``group`` out of service (``retry``: it tries to build again every
        ``rebuild_retry_s``)."""
        with self._lock:
            self._retired.add(group.name)
            self._retired_why[group.name] = why
            if retry:
                self._retry_at[group.name] = time.monotonic() + self.config.rebuild_retry_s
            else:
                self._retry_at.pop(group.name, None)
        RECORDER.set("relay_group_retired", 1, group=group.name)

    def _rejoin(self, group: WorkerGroup) -> bool:
        """Tries to build a group retired because it could not be rebuilt; it serves again
        when the build succeeds (True), else the next try is ``rebuild_retry_s`` later."""
        if self._closed:
            return False
        started = time.perf_counter()
        try:
            group.restart()
        except Exception as exc:  # noqa: BLE001 - still no room: stay retired, try again later
            log.info("group %s still cannot be built (next try in %.0fs): %s", group.name,
                     self.config.rebuild_retry_s, exc)
            with self._lock:
                self._retired_why[group.name] = f"rebuild failed: {exc}"
                self._retry_at[group.name] = time.monotonic() + self.config.rebuild_retry_s
            back = False
        else:
            with self._lock:
                self._retired.discard(group.name)
                self._retired_why.pop(group.name, None)
                self._retry_at.pop(group.name, None)
                self._idle_since[group.name] = time.monotonic()
                self._lock.notify_all()
            RECORDER.set("relay_group_retired", 0, group=group.name)
            log.warning("group %s was built again and serves", group.name)
            self._describe_again(group)
            back = True
        self.trace.append(TraceEntry(group.name, -1, "rejoin", started - self._epoch,
                                     time.perf_counter() - self._epoch))
        return back

    def _fail_stranded(self) -> None:
        """Fails the waiting requests whose next stage no live group runs any more."""
        with self._lock:
            for other in list(self._waiting):
                if not self._servers(other.next_stage):
                    self._waiting.remove(other)
                    self._leave(other)
                    self._finish(other, error=RequestFailed(
                        f"request {other.request_id}: {self._unserved([other.next_stage])}"))
            self._lock.notify_all()

    def _on_out_of_memory(self, group: WorkerGroup, ticket: Ticket, exc: GroupOutOfMemory) -> None:
        """Fails ``ticket`` at once (no retry: the layout cannot hold it) and frees the group:
        kept when its rank freed its memory, rebuilt otherwise."""
        message = self.out_of_memory_message(group, ticket.request, exc.oom)
        log.error("request %s: %s", ticket.request_id, message)
        with self._lock:
            self._leave(ticket)
            self._finish(ticket, error=RequestOutOfMemory(f"request {ticket.request_id}: {message}"))
            self._lock.notify_all()
        if self._closed:
            return
        if exc.keep:
            log.info("group %s kept after the out-of-memory error (its rank freed its memory)", group.name)
        else:
            log.warning("group %s rebuilt after the out-of-memory error (its other ranks may wait in a "
                        "collective)", group.name)
            self._rebuild(group, ticket)

    def out_of_memory_message(self, group: WorkerGroup, request: dict, oom: BaseException) -> str:
        """What a user reads when ``request`` ran out of memory on ``group``."""
        described = group.describe()
        ranks = described.get("ranks", 1)
        layout = described.get("layout") or "single"
        message = (f"{oom}. The request asked for {request.get('width')}x{request.get('height')}, "
                   f"{request.get('frames')} frames, on group {group.name} (layout {layout}, {ranks} "
                   f"rank{'s' if ranks != 1 else ''}); it was not retried: the same layout would run "
                   f"out of memory again.")
        advice = None
        if self.advise is not None:
            try:
                advice = self.advise(request, described, oom)
            except Exception:  # noqa: BLE001 - advice is optional
                log.exception("out-of-memory advice failed")
        return f"{message} {advice or GENERIC_ADVICE}"

    def _timed(self, group: WorkerGroup, ticket: Ticket, kind: str, stage: str):
        return _Timed(self, group.name, ticket, kind, stage)

    def _emit(self, ticket: Ticket, kind: str, **data) -> None:
        if ticket.on_event is not None:
            try:
                ticket.on_event(kind, data)
            except Exception:  # noqa: BLE001 - a consumer's bug must not break scheduling
                log.exception("event callback of request %s failed", ticket.request_id)


#: What may fit instead, when the executor gives no figures.
GENERIC_ADVICE = ("What may fit: a smaller size or fewer frames; --fsdp N to shard the experts over "
                  "N ranks; --offload; more ranks (--ulysses/--ring); --text-encoder cpu.")


class _Timed:
    """Times one group call into the trace and the ticket's run stats."""

    def __init__(self, scheduler: StageScheduler, group: str, ticket: Ticket, kind: str, stage: str) -> None:
        self.scheduler, self.group, self.ticket, self.kind, self.stage = scheduler, group, ticket, kind, stage

    def __enter__(self):
        self.start = time.perf_counter() - self.scheduler._epoch
        return self

    def __exit__(self, *exc) -> None:
        end = time.perf_counter() - self.scheduler._epoch
        self.scheduler.trace.append(TraceEntry(self.group, self.ticket.request_id, self.kind, self.start, end))
        self.ticket.stats.add_seconds(self.stage, end - self.start)
        RECORDER.inc("relay_stage_busy_seconds_total", end - self.start, group=self.group)


def _name(stage) -> str:
    return stage.expert if isinstance(stage, Segment) else stage
