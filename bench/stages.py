"""``relay bench stages``: the two expert stages on separate worker groups, with and without
overlap across requests, against two fused replicas on the same devices.

Three modes over the same two devices (CPU: one core slice each; CUDA: one GPU each), all
through the real executor (Ray actors by default, ``--executor local`` for local processes) and
the stage scheduler:

* *staged overlap*: a high-noise group (encode + high-noise steps) and a low-noise group
  (low-noise steps + decode); request i+1 enters the high-noise group as soon as request i
  leaves it;
* *staged, no overlap*: the same two groups, but request i+1 waits until request i is done;
* *fused x2*: two replicas that each hold both experts and run whole requests.

A batch of requests is submitted at once and timed until the last one is done (requests per
minute). The ideal staged speed-up is ``(Th + Tl) / max(Th, Tl)`` with ``Th`` and ``Tl`` the
per-request busy time of each group measured in the no-overlap runs; *achieved* is the
throughput ratio overlap / no-overlap; the goal is achieved >= 90% of ideal. A batch of N
requests cannot quite reach the ideal (the pipeline fills once): its bound
``N (Th + Tl) / (N max + min)`` is printed too. Utilisation is a group's busy time over the
batch's wall time. Rounds interleave the modes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from relay.bench import common

SMOKE = dict(height=32, width=32, frames=5, steps=6, requests=4)
FULL = dict(height=64, width=64, frames=9, steps=12, requests=16)


def add_arguments(parser) -> None:
    """The stages bench's flags."""
    parser.add_argument("--model", help="MoE Wan 2.2 directory (default: embedded tiny T2V)")
    parser.add_argument("--requests", type=int, help=f"requests per batch (default {FULL['requests']}, "
                                                      f"smoke {SMOKE['requests']})")
    parser.add_argument("--steps", type=int, help=f"default {FULL['steps']} (smoke {SMOKE['steps']})")
    parser.add_argument("--height", type=int, help=f"default {FULL['height']}")
    parser.add_argument("--width", type=int, help=f"default {FULL['width']}")
    parser.add_argument("--frames", type=int, help=f"default {FULL['frames']}")
    parser.add_argument("--shift", type=float, default=5.0, help="flow shift (sets the high/low step split)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="steps per scheduler call / checkpoint (default 1, as relay serve)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray: Ray actor groups (default); local: spawned local processes")
    parser.add_argument("--ray-address", help="existing Ray cluster (default: a local one)")


def skip_reason(args) -> str | None:
    """Needs two devices: always true on a CPU; on CUDA, two GPUs."""
    device = common.resolve_device(args.device)
    if device.type == "cuda":
        import torch

        if torch.cuda.device_count() < 2:
            return "needs 2 CUDA devices (one per stage group)"
    return None


def _settings(args) -> dict:
    base = SMOKE if args.smoke else FULL
    out = {key: getattr(args, key, None) or value for key, value in base.items()}
    if out["requests"] < 2:
        raise common.SettingError(f"--requests must be at least 2, got {out['requests']}")
    return out


def _batch(executor, info, resolved, experts, count: int) -> tuple[float, list[float]]:
    """Submits ``count`` requests at once; returns (wall seconds, per-request latencies)."""
    import time

    finished = {}
    start = time.perf_counter()
    tickets = []
    for _ in range(count):
        ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=experts)
        tickets.append(ticket)
    for ticket in tickets:
        ticket.result(timeout=3600)
        finished[ticket.request_id] = time.perf_counter() - start
    return time.perf_counter() - start, list(finished.values())


def _busy(trace, first_request: int) -> dict[str, dict[int, float]]:
    """Busy seconds per group per request in ``trace`` (requests >= ``first_request``)."""
    busy: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for entry in trace:
        if entry.kind != "restart" and entry.request >= first_request:
            busy[entry.group][entry.request] += entry.end - entry.start
    return busy


def run(args) -> common.BenchResult:
    """Runs the three modes for ``--rounds`` interleaved rounds and reports throughput."""
    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.scheduler import SchedulerConfig
    from relay.engine.stages import request_experts
    from relay.engine.tiny import default_model_dir
    from relay.launch.placement import plan_groups
    from relay.launch.executor import Executor
    from relay.launch.worker import WorkerSpec

    settings = _settings(args)
    rounds = common.rounds(args, smoke=1, full=3)
    device = common.resolve_device(args.device)
    info = read_model_info(args.model or default_model_dir("t2v"))
    if not info.is_moe:
        raise common.SettingError("--model must be a two-expert (MoE) model")
    resolved = resolve_request(GenerationRequest(
        prompt="a lighthouse in a storm, waves crashing", height=settings["height"], width=settings["width"],
        frames=settings["frames"], steps=settings["steps"], seed=0, shift=args.shift), info)
    experts = request_experts(info, resolved)
    spec = WorkerSpec(model=str(info.path), layout=None, dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
                      device_type=device.type)
    if args.checkpoint_every < 1:
        raise common.SettingError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    config = SchedulerConfig(max_queue=settings["requests"] + 1, checkpoint_every=args.checkpoint_every)
    backend = {"local": "mp", "ray": "ray"}[args.executor]
    with Executor(plan_groups(info, resolved, placement="staged", stage_split="1:1"), spec, backend=backend,
                  config=config, ray_address=args.ray_address) as staged:
        with Executor(plan_groups(info, resolved, placement="fused", replicas=2), spec, backend=backend,
                      config=config, ray_address=args.ray_address) as fused:
            raw = _measure(staged, fused, info, resolved, experts, settings["requests"], rounds, config)
    settings.update(executor=args.executor, smoke=args.smoke, shift=args.shift, checkpoint_every=args.checkpoint_every, rounds=rounds, high_steps=experts.count("high_noise"),
                    low_steps=experts.count("low_noise"), model=str(info.path), dtype=spec.dtype)
    return _report(raw, settings, device)


def _measure(staged, fused, info, resolved, experts, count, rounds, config) -> dict:
    raw = {"overlap": [], "no_overlap": [], "fused": [], "stage_busy": [], "utilisation": []}
    for executor in (staged, fused):  # warm-up: the first call of a group includes loading work
        _batch(executor, info, resolved, experts, 2)
    for _ in range(rounds):
        for mode in ("overlap", "no_overlap", "fused"):
            executor = fused if mode == "fused" else staged
            executor.scheduler.config = replace(config, overlap=mode != "no_overlap")
            first_request = max((e.request for e in executor.scheduler.trace), default=-1) + 1
            wall, latencies = _batch(executor, info, resolved, experts, count)
            raw[mode].append({"wall_s": wall, "latency_s": latencies})
            busy = _busy(executor.scheduler.trace, first_request)
            if mode == "no_overlap":
                raw["stage_busy"].append({g: list(per.values()) for g, per in busy.items()})
            if mode == "overlap":
                raw["utilisation"].append({g: sum(per.values()) / wall for g, per in busy.items()})
    return raw


def _report(raw: dict, settings: dict, device) -> common.BenchResult:
    count = settings["requests"]
    per_minute = {mode: common.median([count / r["wall_s"] * 60 for r in raw[mode]])
                  for mode in ("overlap", "no_overlap", "fused")}
    latency = {mode: common.median([x for r in raw[mode] for x in r["latency_s"]]) for mode in per_minute}
    t_high = common.median([x for r in raw["stage_busy"] for x in r.get("high", [])])
    t_low = common.median([x for r in raw["stage_busy"] for x in r.get("low", [])])
    ideal = (t_high + t_low) / max(t_high, t_low)
    # A finite batch also pays one pipeline fill: N requests take N x max + min at best.
    bound = count * (t_high + t_low) / (count * max(t_high, t_low) + min(t_high, t_low))
    achieved = per_minute["overlap"] / per_minute["no_overlap"]
    util = {g: common.median([u[g] for u in raw["utilisation"] if g in u]) for g in ("high", "low")}
    rows = [
        ["staged, overlap", f"{per_minute['overlap']:.2f}", f"{latency['overlap']:.2f}",
         f"{achieved:.2f}x", f"{util['high']:.0%}", f"{util['low']:.0%}"],
        ["staged, no overlap", f"{per_minute['no_overlap']:.2f}", f"{latency['no_overlap']:.2f}", "1.00x", None, None],
        ["fused x2 replicas", f"{per_minute['fused']:.2f}", f"{latency['fused']:.2f}",
         f"{per_minute['fused'] / per_minute['no_overlap']:.2f}x", None, None],
    ]
    title = (f"expert stages on 2 devices ({common.device_name(device)}): {count} requests of "
             f"{settings['width']}x{settings['height']}x{settings['frames']}, {settings['steps']} steps "
             f"({settings['high_steps']} high-noise + {settings['low_steps']} low-noise), "
             f"{settings['rounds']} round(s)")
    notes = [f"stage busy time per request: high {t_high:.3f}s (encode + high-noise steps), "
             f"low {t_low:.3f}s (low-noise steps + decode)",
             f"overlap speed-up: achieved {achieved:.2f}x, ideal (Th+Tl)/max(Th,Tl) = {ideal:.2f}x, "
             f"achieved/ideal = {achieved / ideal:.0%} (goal >= 90%)",
             f"bound for a batch of {count} (one pipeline fill): {bound:.2f}x; achieved/bound = {achieved / bound:.0%}"]
    table = common.format_table(["mode", "req/min", "median latency s", "vs no overlap", "high busy",
                                 "low busy"], rows, title=title, notes=notes)
    summary = {"requests_per_minute": per_minute, "median_latency_s": latency, "stage_high_s": t_high,
               "stage_low_s": t_low, "ideal_speedup": ideal, "achieved_speedup": achieved,
               "achieved_over_ideal": achieved / ideal, "batch_bound_speedup": bound,
               "achieved_over_batch_bound": achieved / bound, "utilisation": util}
    return common.BenchResult(settings=settings, raw=raw, summary=summary, table=table, device=str(device))
