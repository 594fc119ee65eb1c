"""``relay bench simulator``: the discrete-event simulator (``relay simulate``) against the real
stage scheduler running sleep-based stand-in groups with the same call times.

For each scenario -- *fused* (one group of N GPUs), *staged* (N/2 pipelines of a 1-GPU
high-noise and a 1-GPU low-noise group) and *replicas* (N fused 1-GPU groups), at N = 2 and 4 --
the planner prices T2V-A14B on the chosen GPU, the same Poisson arrivals go to
:func:`parallel.simulate.simulate` and to a :class:`~engine.scheduler.StageScheduler` over
:class:`launch.standin.SleepGroup`\\ s (every cost scaled so an idle request of the scenario sleeps about
``--request-ms`` real milliseconds), and throughput and p50/p95 latency are compared (goal: within 10%).

Two figures need the stand-ins because the 2-core CPU bench (``relay bench stages``) cannot
separate them from CPU contention:

* the scheduler's overhead per group call and per step (wall time inside calls over what the
  groups slept), which the simulator then charges per call (``call_s``);
* staged-overlap efficiency: steady-state throughput of a 1:1 pipeline with overlap over the
  same pipeline without overlap, against the ideal ``(Th + Tl) / max(Th, Tl)`` (goal >= 95%).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from relay.bench import common

SMOKE = dict(requests=16, request_ms=150.0)
FULL = dict(requests=60, request_ms=400.0)


def add_arguments(parser) -> None:
    """The simulator bench's flags."""
    parser.add_argument("--gpu", default="h200", help="GPU kind priced by the planner (default h200)")
    parser.add_argument("--model", default="t2v-a14b", help="catalog model (default t2v-a14b)")
    parser.add_argument("--size", default="832x480", help="WIDTHxHEIGHT (default 832x480)")
    parser.add_argument("--requests", type=int, help=f"requests per scenario (default {FULL['requests']}, "
                                                      f"smoke {SMOKE['requests']})")
    parser.add_argument("--request-ms", type=float,
                        help=f"real milliseconds an idle request sleeps (sets each scenario's time scale; default "
                             f"{FULL['request_ms']:.0f}, smoke {SMOKE['request_ms']:.0f})")
    parser.add_argument("--load", type=float, default=0.7,
                        help="arrival rate as a fraction of each scenario's planned capacity (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="arrival seed")


def skip_reason(args) -> str | None:
    """Runs everywhere (threads and sleeps)."""
    return None


def workload(model: str = "t2v-a14b", gpu: str = "h200", size: str = "832x480"):
    """The planner and workload the scenarios are priced with."""
    from relay.parallel import cost
    from relay.parallel.plan import Planner

    width, height = (int(v) for v in size.lower().split("x"))
    work = cost.make_workload(cost.find_model(model), width=width, height=height)
    return Planner(work, cost.find_gpu(gpu), cost.load_calibration()), work


def scenarios(planner, work, sizes=(2, 4)) -> dict[str, object]:
    """``{"fused 2": Cluster, "staged 2": ..., "replicas 4": ...}`` priced by the planner
    (memory feasibility is not required: only the call times matter here)."""
    from relay.parallel.layout import ParallelLayout
    from relay.parallel.plan import FUSED
    from relay.parallel.simulate import cluster_from_plan

    single = ParallelLayout()
    out = {}
    for n in sizes:
        big = planner.best_group(n, FUSED, must_fit=False)
        out[f"fused {n}"] = cluster_from_plan(planner.fused(big.layout), work, kind="fused")
        out[f"staged {n}"] = cluster_from_plan(planner.staged(single, single, replicas=n // 2), work, kind="staged")
        out[f"replicas {n}"] = cluster_from_plan(planner.fused(single, replicas=n), work, kind="replicas")
    return out


def run_real(cluster, arrivals, *, scale: float, config=None):
    """Runs the real scheduler over stand-in groups with requests arriving at ``arrivals``
    (simulated seconds); returns a :class:`~parallel.simulate.SimResult` in simulated seconds."""
    from relay.engine.scheduler import SchedulerConfig, StageScheduler
    from relay.engine.tickets import UPKEEP_KINDS
    from relay.launch.standin import SleepGroup
    from relay.parallel.simulate import RequestRecord, SimResult

    groups = [SleepGroup(g, scale=scale) for g in cluster.groups]
    scheduler = StageScheduler(groups, config or SchedulerConfig(health_period_s=0.0))
    records = [RequestRecord(request_id=i, arrival=t) for i, t in enumerate(arrivals)]
    finished = threading.Semaphore(0)
    epoch = time.perf_counter()

    def on_event(record):
        def handle(kind, data):
            now = (time.perf_counter() - epoch) / scale
            if kind == "started" and record.start is None:
                record.start = now
            elif kind == "done":
                record.done = now
            if kind in ("done", "failed", "cancelled"):
                finished.release()
        return handle

    request = {"experts": list(cluster.experts)}
    lag = 0.0
    try:
        for record in records:
            delay = epoch + record.arrival * scale - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # the arrival process, not a synchronisation
            # Latency counts from the planned arrival (as simulated); a late submit is reported.
            lag = max(lag, (time.perf_counter() - epoch) / scale - record.arrival)
            scheduler.submit(request, experts=cluster.experts, on_event=on_event(record))
        for _ in records:
            finished.acquire()
    finally:
        scheduler.close()
    busy = {g.name: 0.0 for g in groups}
    for entry in scheduler.trace:
        if entry.kind not in UPKEEP_KINDS:
            busy[entry.group] += (entry.end - entry.start) / scale
    result = SimResult(records=records, busy_s=busy, gpus={g.name: g.cost.gpus for g in groups})
    result.notes.update(slept_s=sum(g.slept for g in groups), submit_lag_s=lag)
    return result


def measure_overhead(cluster, *, scale: float, requests: int = 8) -> dict:
    """The scheduler's seconds per group call and per step beyond what the groups slept: one
    fused group, requests submitted together (the group never waits for work), after one
    untimed request (a cold process pays its first calls' imports and thread starts: counted,
    they doubled the figure and the simulation's latencies then ran 10-25% high)."""
    from relay.parallel.simulate import simulate

    run_real(cluster, [0.0], scale=scale)  # warm-up
    arrivals = [0.0] * requests
    began = time.perf_counter()
    real = run_real(cluster, arrivals, scale=scale)
    wall = time.perf_counter() - began
    calls = simulate(cluster, arrivals).calls
    extra = max(0.0, wall - real.notes["slept_s"])
    steps = requests * len(cluster.experts)
    return {"wall_s": wall, "slept_s": real.notes["slept_s"], "calls": calls, "steps": steps,
            "per_call_s": extra / calls, "per_step_s": extra / steps, "fraction": extra / wall}


def steady_throughput(result) -> float:
    """Requests per simulated second between the first and the last completion (the pipeline
    has filled)."""
    done = sorted(r.done for r in result.finished)
    return (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0.0


def staged_efficiency(cluster, *, scale: float, requests: int) -> dict:
    """Steady-state throughput of a staged pipeline with and without overlap (stand-in groups,
    a batch submitted at once) against the ideal speed-up from the groups' own stage times."""
    from relay.engine.scheduler import SchedulerConfig

    high, low = cluster.groups[0], cluster.groups[1]
    th = high.encode_s + sum(high.step_s.get(e, 0.0) for e in cluster.experts if e in high.roles)
    tl = low.handoff_s + sum(low.step_s.get(e, 0.0) for e in cluster.experts if e in low.roles) + low.decode_s
    arrivals = [0.0] * requests
    overlap = run_real(cluster, arrivals, scale=scale, config=SchedulerConfig(health_period_s=0.0))
    serial = run_real(cluster, arrivals, scale=scale, config=SchedulerConfig(health_period_s=0.0, overlap=False))
    achieved = steady_throughput(overlap) / steady_throughput(serial)
    ideal = (th + tl) / max(th, tl)
    return {"high_stage_s": th, "low_stage_s": tl, "ideal_speedup": ideal, "achieved_speedup": achieved,
            "efficiency": achieved / ideal}


def time_scale(cluster, request_ms: float) -> float:
    """Real seconds per simulated second so that one request on the idle ``cluster`` sleeps
    about ``request_ms``."""
    return request_ms / 1000.0 / cluster.planned_latency_s


def compare(name: str, cluster, *, requests: int, load: float, seed: int, request_ms: float,
            per_call_s: float) -> dict:
    """One scenario: the simulation and the real scheduler on the same arrivals.

    Args:
        request_ms: Real milliseconds an idle request sleeps (sets this scenario's time scale).
        per_call_s: The scheduler's real overhead per group call (:func:`measure_overhead`),
            charged by the simulation in simulated seconds.
    """
    from relay.parallel.simulate import poisson_arrivals, simulate

    scale = time_scale(cluster, request_ms)
    call_s = per_call_s / scale
    arrivals = poisson_arrivals(load / cluster.planned_period_s, requests, seed=seed)
    cluster = replace(cluster, groups=tuple(replace(g, call_s=call_s) for g in cluster.groups))
    sim = simulate(cluster, arrivals).summary()
    real = run_real(cluster, arrivals, scale=scale).summary()
    keys = ("throughput_per_hour", "latency_p50_s", "latency_p95_s")
    return {"scenario": name, "label": cluster.label, "groups": len(cluster.groups), "gpus": cluster.gpus,
            "scale": scale, "sim": sim, "real": real, "error": {k: sim[k] / real[k] - 1 for k in keys}}


def run(args) -> common.BenchResult:
    """Overhead, staged efficiency, then every scenario (simulation vs real)."""
    settings = dict(SMOKE if args.smoke else FULL)
    if args.requests is not None:
        settings["requests"] = args.requests
    if args.request_ms is not None:
        settings["request_ms"] = args.request_ms
    if settings["requests"] < 4 or settings["request_ms"] <= 0 or not 0 < args.load < 1:
        raise common.SettingError("--requests must be >= 4, --request-ms positive and --load in (0, 1)")
    planner, work = workload(args.model, args.gpu, args.size)
    clusters = scenarios(planner, work)
    scale = time_scale(clusters["replicas 2"], settings["request_ms"])
    fused_one = replace(clusters["replicas 2"], groups=clusters["replicas 2"].groups[:1])
    overhead = measure_overhead(fused_one, scale=scale, requests=max(4, settings["requests"] // 8))
    efficiency = staged_efficiency(clusters["staged 2"], scale=scale, requests=settings["requests"] // 2)
    rows_raw = [compare(name, c, requests=settings["requests"], load=args.load, seed=args.seed,
                        request_ms=settings["request_ms"], per_call_s=overhead["per_call_s"]) for name, c in clusters.items()]
    worst = max(abs(e) for r in rows_raw for e in r["error"].values())
    rows = [[r["scenario"], r["groups"], f"{r['sim']['throughput_per_hour']:.1f}",
             f"{r['real']['throughput_per_hour']:.1f}", f"{r['error']['throughput_per_hour']:+.1%}",
             f"{r['sim']['latency_p50_s']:.0f}", f"{r['real']['latency_p50_s']:.0f}",
             f"{r['sim']['latency_p95_s']:.0f}", f"{r['real']['latency_p95_s']:.0f}",
             f"{r['error']['latency_p95_s']:+.1%}", f"{r['real']['utilisation']:.0%}"] for r in rows_raw]
    table = common.format_table(
        ["scenario", "groups", "sim req/h", "real req/h", "err", "sim p50 s", "real p50 s", "sim p95 s",
         "real p95 s", "err", "real util"], rows,
        title=f"simulator vs the real scheduler on stand-in groups ({args.model} {args.size} on {args.gpu}, "
              f"load {args.load:.0%}, {settings['requests']} requests; times in simulated seconds, an idle "
              f"request sleeps {settings['request_ms']:.0f} real ms), {common.cpu_name()}",
        notes=[f"largest |sim/real - 1| over throughput, p50 and p95: {worst:.1%} (goal <= 10%: "
               f"{'met' if worst <= 0.10 else 'NOT met'})",
               f"scheduler overhead: {overhead['per_call_s'] * 1e3:.3f} ms per group call, "
               f"{overhead['per_step_s'] * 1e3:.3f} ms per step ({overhead['fraction']:.2%} of a 1-GPU request, "
               f"at this scale)",
               f"staged overlap with stand-ins: achieved {efficiency['achieved_speedup']:.3f}x of ideal "
               f"{efficiency['ideal_speedup']:.3f}x = {efficiency['efficiency']:.1%} (goal >= 95%: "
               f"{'met' if efficiency['efficiency'] >= 0.95 else 'NOT met'})"])
    summary = {"worst_error": worst, "goal_met": worst <= 0.10, "overhead": overhead,
               "staged_efficiency": efficiency, "scale": scale,
               "scenarios": {r["scenario"]: r["error"] for r in rows_raw}}
    settings.update(gpu=args.gpu, model=args.model, size=args.size, load=args.load, seed=args.seed,
                    smoke=bool(args.smoke))
    return common.BenchResult(settings=settings, raw={"scenarios": rows_raw}, summary=summary, table=table,
                              device="cpu")
