"""Discrete-event simulation of Relay's scheduler at cluster scale (``relay simulate``).

The simulator answers what a placement does under load before a cluster is rented: requests
arrive (Poisson, or any list of times), each group spends the cost model's seconds on every call
(:mod:`parallel.cost`: encode, steps per expert, hand-off, decode), and every routing decision is
made by :class:`engine.policy.SchedulingPolicy` -- the object the service's
:class:`~engine.scheduler.StageScheduler` calls -- on real :class:`~engine.tickets.Ticket`\\ s. Only
the clock is simulated. It reports throughput, p50/p95 latency and queueing, and GPU utilisation.

What a group call costs here is what the scheduler's calls cost on a group: a take runs every
consecutive stage the group serves; a segment that begins on a state another group produced
pays the hand-off; every call (prepare, begin, each chunk of ``checkpoint_every`` steps, decode,
the memory read-out) adds ``call_s`` of scheduler overhead, measured on the real scheduler with
stand-in groups (``relay bench simulator``). Failures, health checks and cancels are not
simulated.

Placements are the planner's (:class:`parallel.plan.Planner`): *fused* is one group over every
GPU; *replicas* are several fused groups; *staged* are high-noise / low-noise pipelines (several
when they do not take every GPU). A staged cluster's high groups hand to whichever low group is
free, as the scheduler does.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from relay.engine.experts import DENSE, HIGH, LOW
from relay.engine.policy import SchedulingPolicy
from relay.engine.stages import DECODE, ENCODE
from relay.engine.tickets import SchedulerConfig, Ticket

KINDS = ("fused", "staged", "replicas")


@dataclass(frozen=True, kw_only=True)
class GroupCost:
    """A worker group as the simulator sees it: the stages it serves and what each call costs.

    Attributes:
        name: Group name (``fused0``, ``high1``, ...).
        roles: Stages it runs.
        gpus: Devices of the group (for utilisation).
        step_s: Seconds per denoise step, by expert.
        encode_s: Seconds of ``encode`` (text and image encoding, the initial noise).
        decode_s: Seconds of ``decode``.
        handoff_s: Seconds to begin a segment on a state another group produced.
        call_s: Scheduler overhead per group call.
    """

    name: str
    roles: tuple[str, ...]
    gpus: int
    step_s: Mapping[str, float]
    encode_s: float = 0.0
    decode_s: float = 0.0
    handoff_s: float = 0.0
    call_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Groups serving one request shape.

    Attributes:
        kind: ``fused``, ``staged`` or ``replicas``.
        groups: The groups, in the order the simulator offers them work.
        experts: The expert of each denoise step of a request.
        label: What the tables print (``staged 1:1 x2``).
        planned_period_s: The planner's seconds between finished requests with every group busy
            (its ``requests_per_hour`` inverted), for comparison.
        planned_latency_s: The planner's seconds per video on an idle cluster.
    """

    kind: str
    groups: tuple[GroupCost, ...]
    experts: tuple[str, ...]
    label: str = ""
    planned_period_s: float | None = None
    planned_latency_s: float | None = None

    @property
    def gpus(self) -> int:
        """Devices over every group."""
        return sum(g.gpus for g in self.groups)


@dataclass(kw_only=True)
class RequestRecord:
    """One simulated request's times (seconds from the start)."""

    request_id: int
    arrival: float
    start: float | None = None
    done: float | None = None
    rejected: bool = False

    @property
    def latency(self) -> float:
        """Arrival to done."""
        return self.done - self.arrival

    @property
    def queued(self) -> float:
        """Arrival to its first group call."""
        return self.start - self.arrival


@dataclass(kw_only=True)
class SimResult:
    """What a simulation (or a real run measured the same way) gives.

    Attributes:
        records: Every request, admitted or refused.
        busy_s: Per group, seconds inside calls.
        gpus: Per group, its devices.
        calls: Group calls made.
    """

    records: list[RequestRecord]
    busy_s: dict[str, float]
    gpus: dict[str, int]
    calls: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def finished(self) -> list[RequestRecord]:
        """The requests that completed."""
        return [r for r in self.records if r.done is not None]

    @property
    def makespan_s(self) -> float:
        """First arrival to last completion."""
        done = self.finished
        if not done:
            return 0.0
        return max(r.done for r in done) - min(r.arrival for r in self.records)

    @property
    def throughput_per_hour(self) -> float:
        """Finished requests per hour over the makespan."""
        span = self.makespan_s
        return 3600.0 * len(self.finished) / span if span > 0 else 0.0

    def latency(self, q: float) -> float:
        """The ``q`` quantile (0..1) of arrival-to-done seconds."""
        return percentile([r.latency for r in self.finished], q)

    def queueing(self, q: float) -> float:
        """The ``q`` quantile of arrival-to-first-call seconds."""
        return percentile([r.queued for r in self.finished], q)

    @property
    def utilisation(self) -> float:
        """GPU-seconds inside calls over GPUs x makespan."""
        span = self.makespan_s
        total = sum(self.gpus.values())
        if span <= 0 or not total:
            return 0.0
        return sum(self.busy_s[g] * self.gpus[g] for g in self.busy_s) / (total * span)

    def summary(self) -> dict:
        """The table's figures (seconds, requests per hour, utilisation 0..1)."""
        return {"requests": len(self.records), "finished": len(self.finished),
                "rejected": sum(r.rejected for r in self.records),
                "throughput_per_hour": self.throughput_per_hour,
                "latency_p50_s": self.latency(0.5), "latency_p95_s": self.latency(0.95),
                "queue_p50_s": self.queueing(0.5), "queue_p95_s": self.queueing(0.95),
                "utilisation": self.utilisation, "makespan_s": self.makespan_s}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def poisson_arrivals(rate_per_s: float, count: int, *, seed: int = 0) -> list[float]:
    """``count`` arrival times of a Poisson process of ``rate_per_s`` (the first at 0)."""
    if rate_per_s <= 0 or count < 1:
        raise ValueError(f"rate must be positive and count at least 1, got {rate_per_s} and {count}")
    rng = random.Random(seed)
    times, now = [0.0], 0.0
    for _ in range(count - 1):
        now += rng.expovariate(rate_per_s)
        times.append(now)
    return times


def take_cost(group: GroupCost, ticket: Ticket, step: int, policy: SchedulingPolicy) -> tuple[float, int, int]:
    """Runs ``ticket``'s stages that ``group`` serves (popping them, as the scheduler does).

    Args:
        step: The request's next step index.

    Returns:
        ``(seconds, calls, next step index)``.
    """
    seconds, calls, first = 0.0, 0, True
    total = sum(1 for _ in ticket.request["experts"])
    while policy.keeps(ticket, group.roles):
        stage = ticket.stages.pop(0)
        if stage == ENCODE:
            seconds += group.encode_s
            calls += 1
        elif stage == DECODE:
            seconds += group.decode_s
            calls += 1
        else:
            calls += 1  # begin: on a state another group produced, a hand-off
            seconds += group.handoff_s if first else 0.0
            for count, _ in policy.chunks(step, stage.end, total=total):
                seconds += count * group.step_s[stage.expert]
                calls += 1
            step = stage.end
        first = False
    calls += 1  # the memory read-out at the end of the take
    return seconds + calls * group.call_s, calls, step


def simulate(cluster: Cluster, arrivals: Sequence[float], *, config: SchedulerConfig | None = None,
             priorities: Sequence[int] | None = None) -> SimResult:
    """Runs requests arriving at ``arrivals`` through ``cluster`` in simulated time.

    Args:
        cluster: The groups and the request's expert schedule.
        arrivals: Arrival times (seconds, non-decreasing).
        config: The scheduler's policy settings (``max_queue``, ``checkpoint_every``, ``overlap``).
        priorities: Per request (default 0).

    Returns:
        Every request's times and the groups' busy seconds.
    """
    config = config or SchedulerConfig()
    policy = SchedulingPolicy(config)
    stages = policy.stages(cluster.experts)
    missing = {s if isinstance(s, str) else s.expert for s in stages} - {r for g in cluster.groups for r in g.roles}
    if missing:
        raise ValueError(f"no group of {cluster.label or cluster.kind} runs stage(s) {sorted(missing)}")
    records = [RequestRecord(request_id=i, arrival=float(t)) for i, t in enumerate(arrivals)]
    tickets: dict[int, Ticket] = {}
    steps: dict[int, int] = {}
    busy = {g.name: 0.0 for g in cluster.groups}
    idle = {g.name: True for g in cluster.groups}
    waiting: list[Ticket] = []
    in_flight, calls, order = 0, 0, 0
    events: list[tuple] = []
    for record in records:
        heapq.heappush(events, (record.arrival, order, "arrive", record.request_id, None))
        order += 1
    request = {"experts": cluster.experts}
    while events:
        # One event at a time, each followed by dispatch: a free group takes work the moment it
        # is there, as a scheduler thread wakes on submit.
        now, _, kind, request_id, group = heapq.heappop(events)
        if kind == "arrive":
            if policy.admission_error(sum(1 for t in waiting if not t.entered)):
                records[request_id].rejected = True
                continue
            priority = priorities[request_id] if priorities is not None else 0
            tickets[request_id] = Ticket(request_id=request_id, request=request, priority=priority,
                                         stages=list(stages), submitted=now)
            steps[request_id] = 0
            waiting.append(tickets[request_id])
        else:
            idle[group.name] = True
            ticket = tickets[request_id]
            if ticket.stages:
                waiting.append(ticket)
            else:
                ticket.entered = False
                in_flight -= 1
                records[request_id].done = now
        progressed = True
        while progressed:  # free groups take work until none can
            progressed = False
            for group in cluster.groups:
                if not idle[group.name]:
                    continue
                ticket = policy.pick(waiting, group.roles, in_flight)
                if ticket is None:
                    continue
                waiting.remove(ticket)
                if not ticket.entered:
                    ticket.entered = True
                    in_flight += 1
                record = records[ticket.request_id]
                if record.start is None:
                    record.start = now
                seconds, made, steps[ticket.request_id] = take_cost(group, ticket, steps[ticket.request_id], policy)
                calls += made
                busy[group.name] += seconds
                idle[group.name] = False
                heapq.heappush(events, (now + seconds, order, "free", ticket.request_id, group))
                order += 1
                progressed = True
    return SimResult(records=records, busy_s=busy, gpus={g.name: g.gpus for g in cluster.groups}, calls=calls)


# --- clusters from the planner -------------------------------------------------------------------
def expert_schedule(work) -> tuple[str, ...]:
    """The expert of each step of a planner :class:`~parallel.cost.Workload` (high-noise steps
    first, as the boundary splits them)."""
    counts = work.expert_steps
    if DENSE in counts:
        return (DENSE,) * counts[DENSE]
    return (HIGH,) * counts[HIGH] + (LOW,) * counts[LOW]


def cluster_from_plan(plan, work, *, kind: str | None = None, call_s: float = 0.0) -> Cluster:
    """The groups of a planner :class:`~parallel.plan.Plan`, priced by its breakdown.

    Fused replicas run every stage; a staged pipeline's high group encodes and runs the
    high-noise steps, its low group takes the hand-off, runs the low-noise steps and decodes.
    """
    out = plan.breakdown
    groups = []
    for replica in range(plan.replicas):
        if plan.placement == "fused":
            g = plan.groups[0]
            groups.append(GroupCost(name=f"fused{replica}", roles=(ENCODE, *work.expert_steps, DECODE),
                                    gpus=g.layout.world_size, step_s=dict(g.step_s),
                                    encode_s=out["encode"] + out.get("offload", 0.0), decode_s=out["decode"],
                                    call_s=call_s))
        else:
            high, low = plan.groups
            groups.append(GroupCost(name=f"high{replica}", roles=(ENCODE, HIGH), gpus=high.layout.world_size,
                                    step_s=dict(high.step_s), encode_s=out["encode"], call_s=call_s))
            groups.append(GroupCost(name=f"low{replica}", roles=(LOW, DECODE), gpus=low.layout.world_size,
                                    step_s=dict(low.step_s), decode_s=out["decode"],
                                    handoff_s=out.get("handoff", 0.0), call_s=call_s))
    kind = kind or ("fused" if plan.placement == "fused" and plan.replicas == 1 else
                    "replicas" if plan.placement == "fused" else "staged")
    # Staged pipelines: high groups first, so a free high group is offered new work in order.
    groups.sort(key=lambda g: (not g.name.startswith(("fused", "high")), g.name))
    return Cluster(kind=kind, groups=tuple(groups), experts=expert_schedule(work),
                   label=f"{plan.placement_label()}: {plan.describe()}",
                   planned_period_s=3600.0 / plan.requests_per_hour, planned_latency_s=plan.seconds_per_video)


def best_plans(planner, gpus: int, kinds: Sequence[str] = KINDS) -> dict[str, object]:
    """The planner's best feasible plan of each kind on ``gpus`` GPUs, by throughput.

    ``fused``: one group of every GPU; ``replicas``: several fused groups; ``staged``:
    high/low pipelines. A kind with no feasible plan is left out.
    """
    from relay.parallel.plan import rank

    plans = [p for p in planner.enumerate(gpus) if p.feasible]
    by_kind = {"fused": [p for p in plans if p.placement == "fused" and p.replicas == 1],
               "replicas": [p for p in plans if p.placement == "fused" and p.replicas > 1],
               "staged": [p for p in plans if p.placement == "staged"]}
    out = {}
    for kind in kinds:
        ranked = rank(by_kind[kind], by="throughput")
        if ranked:
            out[kind] = ranked[0]
    return out
