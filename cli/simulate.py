"""``relay simulate``: Relay's scheduler at cluster scale, in simulated time (no GPU needed).

    relay simulate --gpu h100 --model t2v-a14b --gpus 8,64,256 --size 1280x720 --load 0.8

For each GPU count, the planner's best plan of each kind (fused: one group; replicas: several
fused groups; staged: high/low pipelines) serves the same Poisson arrivals through the real
scheduling policy (:mod:`parallel.simulate`); the table gives throughput, p50/p95 latency,
queueing and GPU utilisation. Bad flags exit with code 2 and name the flag.
"""

from __future__ import annotations

import json
import sys

from relay.engine.errors import ValidationError

EXIT_USAGE = 2
#: Scheduler overhead per group call (seconds), as ``relay bench simulator`` measured it on the
#: real scheduler with stand-in groups (0.21 ms on a 2-core Xeon, bench/results).
DEFAULT_CALL_S = 0.0002


def add_parser(sub) -> None:
    """Registers ``relay simulate`` on the subparsers ``sub`` (imports nothing heavy)."""
    p = sub.add_parser(
        "simulate", help="simulate the scheduler on 8-256 GPUs: throughput, p50/p95 latency, utilisation",
        description="Discrete-event simulation of Relay's stage scheduler: Poisson arrivals, call times "
                    "from the layout planner's cost model, the scheduler's own routing policy; fused vs "
                    "staged vs replicas on each GPU count.")
    p.add_argument("--gpu", required=True, help="GPU kind from parallel/data/gpus.json (as relay plan)")
    p.add_argument("--model", required=True, help="catalog model: t2v-a14b, i2v-a14b, ti2v-5b, ltx2")
    p.add_argument("--gpus", default="8,16,32,64,128,256", help="GPU counts, comma-separated (default 8..256)")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--frames", type=int, help="frames (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--preset", help="a recipe, as relay plan --preset (lightning)")
    p.add_argument("--kinds", default="fused,staged,replicas", help="placements to compare (default all three)")
    p.add_argument("--load", type=float, default=0.8,
                   help="arrival rate as a fraction of the fastest kind's planned capacity at each GPU count "
                        "(default 0.8; every kind gets the same arrivals)")
    p.add_argument("--rate", type=float, help="arrivals per hour instead of --load (same at every GPU count)")
    p.add_argument("--requests", type=int, help="requests per run (default: max(300, 30 per group))")
    p.add_argument("--seed", type=int, default=0, help="arrival seed (default 0)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait to enter (as relay serve)")
    p.add_argument("--checkpoint-every", type=int, default=1, help="steps per group call (as relay serve)")
    p.add_argument("--call-ms", type=float, default=DEFAULT_CALL_S * 1e3,
                   help=f"scheduler overhead per group call in ms (default {DEFAULT_CALL_S * 1e3:g}, measured by "
                        "relay bench simulator)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the catalog's)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.set_defaults(handler=run)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or any(not 1 <= n <= 4096 for n in counts):
        raise ValidationError("gpus", f"must be comma-separated GPU counts in 1..4096, got {text!r}")
    return counts


def _check(args) -> tuple[list[int], list[str]]:
    from relay.parallel.simulate import KINDS

    counts = _counts(args.gpus)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValidationError("kinds", f"must be among {', '.join(KINDS)}, got {args.kinds!r}")
    if args.rate is None and not 0 < args.load <= 2:
        raise ValidationError("load", f"must be in (0, 2], got {args.load}")
    if args.rate is not None and args.rate <= 0:
        raise ValidationError("rate", f"must be positive, got {args.rate}")
    if args.requests is not None and not 1 <= args.requests <= 1_000_000:
        raise ValidationError("requests", f"must be in 1..1000000, got {args.requests}")
    if args.max_queue < 0:
        raise ValidationError("max_queue", f"must be >= 0, got {args.max_queue}")
    if args.checkpoint_every < 1:
        raise ValidationError("checkpoint_every", f"must be >= 1, got {args.checkpoint_every}")
    if args.call_ms < 0:
        raise ValidationError("call_ms", f"must be >= 0, got {args.call_ms}")
    return counts, kinds


def simulate_rows(args) -> list[dict]:
    """Every (GPU count, kind) row of the table, as dictionaries."""
    from dataclasses import replace

    from relay.cli.plan import _size
    from relay.engine.tickets import SchedulerConfig
    from relay.parallel import cost
    from relay.parallel.plan import Planner
    from relay.parallel.simulate import best_plans, cluster_from_plan, poisson_arrivals, simulate

    counts, kinds = _check(args)
    gpu, model = cost.find_gpu(args.gpu), cost.find_model(args.model)
    if args.gpus_per_node is not None:
        if args.gpus_per_node < 1:
            raise ValidationError("gpus_per_node", f"must be positive, got {args.gpus_per_node}")
        gpu = replace(gpu, gpus_per_node=args.gpus_per_node)
    width, height = _size(args.size)
    work = cost.make_workload(model, width=width, height=height, frames=args.frames, steps=args.steps,
                              preset=args.preset)
    planner = Planner(work, gpu, cost.load_calibration())
    config = SchedulerConfig(max_queue=args.max_queue, checkpoint_every=args.checkpoint_every)
    rows = []
    for n in counts:
        clusters = {k: cluster_from_plan(p, work, kind=k, call_s=args.call_ms / 1e3)
                    for k, p in best_plans(planner, n, kinds).items()}
        if not clusters:
            rows.append({"gpus": n, "kind": None, "note": "no plan fits in memory"})
            continue
        rate = (args.rate / 3600.0 if args.rate is not None
                else args.load * max(1.0 / c.planned_period_s for c in clusters.values()))
        count = args.requests or max(300, 30 * max(len(c.groups) for c in clusters.values()))
        arrivals = poisson_arrivals(rate, count, seed=args.seed)
        for kind in kinds:
            if kind not in clusters:
                rows.append({"gpus": n, "kind": kind, "note": "no plan of this kind fits"})
                continue
            cluster = clusters[kind]
            result = simulate(cluster, arrivals, config=config)
            rows.append({"gpus": n, "kind": kind, "plan": cluster.label, "groups": len(cluster.groups),
                         "arrivals_per_hour": rate * 3600.0, "planned_per_hour": 3600.0 / cluster.planned_period_s,
                         "planned_latency_s": cluster.planned_latency_s, **result.summary()})
    return rows


def run(args) -> int:
    """Runs ``relay simulate``; returns the exit code (2 for a bad flag)."""
    try:
        rows = simulate_rows(args)
    except ValidationError as exc:
        print(f"relay simulate: error: --{exc.field.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(rows, args))
    return 0


def table(rows: list[dict], args) -> str:
    """The printed table of :func:`simulate_rows`."""
    headers = ["GPUs", "kind", "plan", "groups", "arrive/h", "served/h", "planned/h", "p50 s", "p95 s",
               "queue p95 s", "GPU util", "refused"]
    body = []
    for r in rows:
        if r.get("kind") is None or "plan" not in r:
            body.append([r["gpus"], r.get("kind") or "-", r["note"], *[""] * 9])
            continue
        body.append([r["gpus"], r["kind"], r["plan"], r["groups"], f"{r['arrivals_per_hour']:.0f}",
                     f"{r['throughput_per_hour']:.0f}", f"{r['planned_per_hour']:.0f}", f"{r['latency_p50_s']:.0f}",
                     f"{r['latency_p95_s']:.0f}", f"{r['queue_p95_s']:.0f}", f"{r['utilisation']:.0%}",
                     r["rejected"]])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=True)]
    lines = [f"relay simulate: {args.model} on {args.gpu}, "
             + (f"{args.rate:g} arrivals/h" if args.rate is not None else f"load {args.load:g} of the fastest kind")
             + f", seed {args.seed}",
             "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in body]
    lines.append("served/h: finished over first arrival to last finish; refused: over --max-queue; "
                 "planned/h: relay plan's figure with every group busy")
    return "\n".join(lines)
