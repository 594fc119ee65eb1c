"""The discrete-event simulator (``relay simulate``): exact on cases with a closed form, the
same routing as the real scheduler (one policy object), and within 10% of the real scheduler
running sleep-based stand-in groups on the same arrivals."""

from __future__ import annotations

import json

import pytest

from relay.engine.experts import HIGH, LOW
from relay.engine.policy import SchedulingPolicy
from relay.engine.stages import DECODE, ENCODE
from relay.engine.tickets import SchedulerConfig
from relay.parallel.simulate import Cluster, GroupCost, percentile, poisson_arrivals, simulate

EXPERTS = (HIGH,) * 3 + (LOW,) * 2


def _fused(name="fused0", call_s=0.0):
    return GroupCost(name=name, roles=(ENCODE, HIGH, LOW, DECODE), gpus=2, step_s={HIGH: 2.0, LOW: 3.0},
                     encode_s=1.0, decode_s=4.0, call_s=call_s)


def _pipeline(replica=0):
    return (GroupCost(name=f"high{replica}", roles=(ENCODE, HIGH), gpus=1, step_s={HIGH: 2.0}, encode_s=1.0),
            GroupCost(name=f"low{replica}", roles=(LOW, DECODE), gpus=1, step_s={LOW: 3.0}, decode_s=4.0,
                      handoff_s=0.5))


def test_an_idle_fused_group_takes_the_sum_of_its_calls():
    call_s = 0.01
    result = simulate(Cluster(kind="fused", groups=(_fused(call_s=call_s),), experts=EXPERTS), [0.0, 100.0])
    # encode 1 + 3 x 2 + 2 x 3 + decode 4; calls: prepare, begin + 3 steps, begin + 2 steps, decode, memory.
    calls = 1 + 4 + 3 + 1 + 1
    assert result.calls == 2 * calls
    for record, arrival in zip(result.records, (0.0, 100.0), strict=True):
        assert record.latency == pytest.approx(17.0 + calls * call_s)
        assert record.start == arrival
    assert result.utilisation == pytest.approx(2 * (17.0 + calls * call_s) / (100.0 + 17.0 + calls * call_s))


def test_a_staged_pipeline_overlaps_requests_at_the_slower_stage():
    # High stage 1 + 3 x 2 = 7 s; low stage 0.5 + 2 x 3 + 4 = 10.5 s: a batch finishes every 10.5 s.
    cluster = Cluster(kind="staged", groups=_pipeline(), experts=EXPERTS)
    result = simulate(cluster, [0.0] * 5)
    done = [r.done for r in result.records]
    assert done == pytest.approx([7.0 + 10.5 * (k + 1) for k in range(5)])
    serial = simulate(cluster, [0.0] * 5, config=SchedulerConfig(overlap=False))
    assert [r.done for r in serial.records] == pytest.approx([17.5 * (k + 1) for k in range(5)])


def test_high_groups_hand_off_to_whichever_low_group_is_free():
    cluster = Cluster(kind="staged", groups=(*_pipeline(0), *_pipeline(1)), experts=EXPERTS)
    result = simulate(cluster, [0.0] * 4)
    # Two pipelines: requests 0, 1 finish together, then 2, 3 one low stage later.
    assert sorted(r.done for r in result.records) == pytest.approx([17.5, 17.5, 28.0, 28.0])
    assert result.busy_s["low0"] == pytest.approx(21.0) and result.busy_s["low1"] == pytest.approx(21.0)


def test_the_queue_bound_refuses_as_the_service_does():
    cluster = Cluster(kind="fused", groups=(_fused(),), experts=EXPERTS)
    result = simulate(cluster, [0.0] * 5, config=SchedulerConfig(max_queue=2))
    # The first enters at once; two may wait; the other two are refused.
    assert [r.rejected for r in result.records] == [False, False, False, True, True]
    assert len(result.finished) == 3


def test_the_scheduler_and_the_simulator_route_with_one_policy(monkeypatch):
    """Swapping the policy's rule changes both: last-in-first-out instead of FIFO."""
    import threading

    from relay.engine.scheduler import StageScheduler
    from relay.launch.standin import SleepGroup

    def lifo(ticket):
        progress = -len(ticket.stages) if ticket.entered else 0
        return (progress, -ticket.priority, -ticket.request_id)

    monkeypatch.setattr(SchedulingPolicy, "rank", staticmethod(lifo))
    cluster = Cluster(kind="fused", groups=(_fused(),), experts=EXPERTS)
    simulated = simulate(cluster, [0.0, 0.0, 0.0, 0.0])
    sim_order = [r.request_id for r in sorted(simulated.records, key=lambda r: r.done)]
    gate, started = threading.Event(), threading.Event()
    group = SleepGroup(cluster.groups[0], scale=0.001)
    prepare = group.prepare

    def held_prepare(request, *, timeout_s):  # the first request holds the group until all are queued
        gate.wait(10)
        return prepare(request, timeout_s=timeout_s)

    group.prepare = held_prepare
    scheduler = StageScheduler([group], SchedulerConfig(health_period_s=0.0))
    try:
        first = scheduler.submit({"experts": list(EXPERTS)}, experts=EXPERTS,
                                 on_event=lambda kind, data: kind == "started" and started.set())
        assert started.wait(10)  # the group holds request 0 (in prepare) while the others queue
        tickets = [first, *(scheduler.submit({"experts": list(EXPERTS)}, experts=EXPERTS) for _ in range(3))]
        gate.set()
        for ticket in tickets:
            ticket.result(timeout=30)
        order = [t.request_id for t in sorted(tickets, key=lambda t: t.stats.seconds["total"] + t.submitted)]
    finally:
        scheduler.close()
    assert sim_order == [0, 3, 2, 1]
    assert order == sim_order


def test_percentiles_and_poisson_arrivals():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile([5.0], 0.95) == 5.0
    times = poisson_arrivals(2.0, 4001, seed=3)
    assert times == poisson_arrivals(2.0, 4001, seed=3) and times[0] == 0.0
    assert 4000 / times[-1] == pytest.approx(2.0, rel=0.06)


@pytest.fixture(scope="module")
def scenarios():
    from relay.bench.simulator import scenarios, workload

    planner, work = workload("t2v-a14b", "h200", "832x480")
    return scenarios(planner, work)


def _scale(scenarios, request_ms=150.0):
    from relay.bench.simulator import time_scale

    return time_scale(scenarios["replicas 2"], request_ms)


def test_simulation_matches_the_real_scheduler_on_stand_in_groups(scenarios):
    """Fused, staged and replicas at 2 and 4 groups: throughput and p95 latency within 10% (p50 is
    reported by ``relay bench simulator``; on 20 requests it moves with a single request)."""
    from relay.bench.simulator import compare, measure_overhead

    scale = _scale(scenarios)
    one = scenarios["replicas 2"]
    overhead = measure_overhead(Cluster(kind="fused", groups=one.groups[:1], experts=one.experts), scale=scale,
                                requests=3)
    assert 0 < overhead["per_call_s"] < 0.005  # under 5 ms per call, even on a loaded 2-core CI machine
    errors = {}
    for name, cluster in scenarios.items():
        row = compare(name, cluster, requests=20, load=0.7, seed=1, request_ms=150.0,
                      per_call_s=overhead["per_call_s"])
        assert row["real"]["finished"] == 20 and row["sim"]["finished"] == 20
        errors[name] = {k: row["error"][k] for k in ("throughput_per_hour", "latency_p95_s")}
    worst = {name: max(abs(v) for v in e.values()) for name, e in errors.items()}
    assert max(worst.values()) <= 0.10, errors


def test_staged_overlap_reaches_95_percent_of_ideal_with_stand_ins(scenarios):
    from relay.bench.simulator import staged_efficiency

    result = staged_efficiency(scenarios["staged 2"], scale=_scale(scenarios), requests=8)
    assert result["ideal_speedup"] > 1.3
    assert result["efficiency"] >= 0.95, result


def test_relay_simulate_prints_every_kind_and_refuses_bad_flags(relay):
    result = relay("simulate", "--gpu", "h100", "--model", "t2v-a14b", "--gpus", "8,32", "--requests", "60",
                   "--json")
    rows = json.loads(result.out)
    assert [(r["gpus"], r["kind"]) for r in rows] == [(n, k) for n in (8, 32) for k in ("fused", "staged", "replicas")]
    for row in rows:
        assert row["finished"] + row["rejected"] == 60
        assert row["latency_p95_s"] >= row["latency_p50_s"] >= row["planned_latency_s"] * 0.999
        assert 0 < row["utilisation"] <= 1
    table = relay("simulate", "--gpu", "h100", "--model", "t2v-a14b", "--gpus", "16", "--requests", "40").out
    assert "staged" in table and "p95 s" in table
    for flags, name in ((["--gpus", "0"], "--gpus"), (["--kinds", "pipelined"], "--kinds"),
                        (["--load", "0"], "--load"), (["--size", "12x7"], "--size")):
        bad = relay("simulate", "--gpu", "h100", "--model", "t2v-a14b", *flags)
        assert bad.code == 2 and name in bad.err, bad.err
