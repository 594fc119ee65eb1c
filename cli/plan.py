"""``relay plan``: ranks the ways to lay a Wan 2.2 model out on N GPUs by predicted seconds per
video (or throughput) with the cost model of :mod:`parallel.cost`, or prices one given layout.

    relay plan --gpus 8 --gpu h100 --model t2v-a14b --size 1280x720
    relay plan --gpu h100 --model t2v-a14b --layout "ulysses=8,fsdp=8" --json

Bad flags exit with code 2 and name the flag.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import replace

from relay.engine.errors import ValidationError

EXIT_USAGE = 2
_FLAG_OF = {"cfg_parallel": "cfg", "nproc": "gpus"}


def add_parser(sub) -> None:
    """Registers ``relay plan`` on the subparsers ``sub`` (imports nothing heavy)."""
    p = sub.add_parser(
        "plan", help="rank parallel layouts for N GPUs with a cost model (no GPU needed)",
        description="Predict seconds per video, requests per hour and memory per GPU of every "
                    "layout (ulysses x ring x cfg x fsdp, fused or staged experts, replicas) of a "
                    "Wan 2.2 or LTX-2 model on N GPUs, from FLOPs, link bandwidths and datasheet figures "
                    "calibrated on the published Wan 2.2 timings; rank them and say why.")
    p.add_argument("--gpus", type=int, help="GPUs to plan for (with --layout: default the layout's size)")
    p.add_argument("--gpu", required=True, help="GPU kind from parallel/data/gpus.json: h100, h200, a100, "
                                                "h20, l40s, a6000, 4090 (or an alias such as h800)")
    p.add_argument("--model", required=True, help="catalog model (engine/models/*/catalog.json): t2v-a14b, "
                                                  "i2v-a14b, ti2v-5b (Wan 2.2), ltx2 (LTX-2)")
    p.add_argument("--size", help="WIDTHxHEIGHT, e.g. 1280x720 or 832x480 (default: the model's)")
    p.add_argument("--frames", type=int, help="frames, 4k+1 for Wan, 8k+1 for LTX-2 (default: the model's, 81 or 121)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's: 40 or 50 for Wan, 30 for LTX-2)")
    p.add_argument("--preset", help="price a recipe: lightning (4 Euler steps, guidance 1: one forward per step)")
    p.add_argument("--layout", help="price one layout instead of ranking, with the keys of the layout "
                                    "flags: ulysses=8,fsdp=8 | cfg=2,ulysses=4,fsdp=8 | ring=2 | "
                                    "placement=staged,split=5:3 | replicas=2 | offload=true | "
                                    "vae=whole|parallel|tiled (decode mode; default: parallel on a group of "
                                    "several GPUs)")
    p.add_argument("--rank-by", choices=("latency", "throughput"), default="latency",
                   help="order by seconds per video (default) or by requests per hour")
    p.add_argument("--top", type=int, default=10, help="layouts to show (default 10; 0 = all)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the catalog's, 8)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Runs ``relay plan``; returns the exit code (2 for a bad flag)."""
    try:
        planner, plans, num_gpus = _plans(args)
    except ValidationError as exc:
        flag = "--" + _FLAG_OF.get(exc.field, exc.field).replace("_", "-")
        print(f"relay plan: error: {flag}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    from relay.parallel.plan import rank

    ranked = rank(plans, by=args.rank_by)
    shown = ranked[:args.top] if args.top else ranked
    if args.json:
        print(json.dumps([dict(rank=i + 1, **p.as_dict()) for i, p in enumerate(shown)], indent=2))
    else:
        print(_table(planner, ranked, shown, num_gpus, args.rank_by))
    return 0


def _plans(args):
    from relay.parallel import cost
    from relay.parallel.plan import Planner

    gpu, model = cost.find_gpu(args.gpu), cost.find_model(args.model)
    if args.gpus_per_node is not None:
        if args.gpus_per_node < 1:
            raise ValidationError("gpus_per_node", f"must be positive, got {args.gpus_per_node}")
        gpu = replace(gpu, gpus_per_node=args.gpus_per_node)
    if args.top < 0:
        raise ValidationError("top", f"must be 0 (all) or positive, got {args.top}")
    if args.gpus is not None and not 1 <= args.gpus <= 4096:
        raise ValidationError("gpus", f"must be in 1..4096, got {args.gpus}")
    width, height = _size(args.size)
    work = cost.make_workload(model, width=width, height=height, frames=args.frames, steps=args.steps,
                              preset=args.preset)
    planner = Planner(work, gpu, cost.load_calibration())
    if args.layout is not None:
        plan = evaluate_layout(planner, args.layout, args.gpus)
        return planner, [plan], plan.gpus
    if args.gpus is None:
        raise ValidationError("gpus", "is required (or give --layout)")
    return planner, planner.enumerate(args.gpus), args.gpus


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*[x*X]\s*(\d+)\s*", text)
    if not match:
        raise ValidationError("size", f"must be WIDTHxHEIGHT like 1280x720, got {text!r}")
    return int(match.group(1)), int(match.group(2))


LAYOUT_KEYS = ("ulysses", "ring", "cfg", "fsdp", "placement", "split", "replicas", "offload", "vae")


def parse_layout(text: str) -> dict[str, object]:
    """Parses ``--layout`` (``ulysses=8,fsdp=8``, ``placement=staged,split=5:3``, ``replicas=2``).

    Raises:
        ValidationError: ``layout``, naming the bad key or value.
    """
    out: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in LAYOUT_KEYS:
            raise ValidationError("layout", f"{part!r} is not KEY=VALUE with KEY one of {', '.join(LAYOUT_KEYS)}")
        if key in out:
            raise ValidationError("layout", f"{key} given twice")
        if key == "placement":
            if value not in ("fused", "staged"):
                raise ValidationError("layout", f"placement must be fused or staged, got {value!r}")
            out[key] = value
        elif key == "split":
            high, colon, low = value.partition(":")
            if not (colon and high.isdigit() and low.isdigit() and int(high) > 0 and int(low) > 0):
                raise ValidationError("layout", f"split must be HIGH:LOW device counts like 5:3, got {value!r}")
            out[key] = (int(high), int(low))
        elif key == "vae":
            if value not in ("whole", "parallel", "tiled"):
                raise ValidationError("layout", f"vae must be whole, parallel (--vae-parallel) or tiled (--vae-tiling), "
                                                f"got {value!r}")
            out[key] = value
        elif key == "offload":
            if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise ValidationError("layout", f"offload must be true or false, got {value!r}")
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            if not value.isdigit() or int(value) < 1:
                raise ValidationError("layout", f"{key} must be a positive integer, got {value!r}")
            out[key] = int(value)
    if not out:
        raise ValidationError("layout", "is empty; e.g. ulysses=8,fsdp=8")
    if "split" in out and out.get("placement", "staged") != "staged":
        raise ValidationError("layout", "split needs placement=staged")
    if "split" in out:
        out["placement"] = "staged"
    return out


def evaluate_layout(planner, text: str, num_gpus: int | None):
    """Prices the one layout ``--layout`` describes on ``num_gpus`` GPUs (``None``: its own size).

    A fused group has ``--gpus / replicas`` GPUs (without ``--gpus``: cfg x ulysses x ring) and
    its unset degrees complete as for ``relay generate --nproc`` (Ulysses takes what is left
    after cfg and ring). With ``placement=staged`` the degrees apply to each stage group, and
    without any the planner picks each group's fastest layout; without ``split``
    :func:`engine.stages.propose_split` sizes the groups.

    Raises:
        ValidationError: ``layout`` (or ``gpus``), naming what does not fit.
    """
    spec = parse_layout(text)
    replicas = spec.get("replicas")
    if num_gpus is not None and replicas is not None and num_gpus % replicas:
        raise ValidationError("layout", f"replicas={replicas} does not divide --gpus {num_gpus}")
    if spec.get("placement") == "staged":
        return _staged(planner, spec, num_gpus)
    given = [spec[k] for k in ("cfg", "ulysses", "ring") if k in spec]
    if num_gpus is not None:
        group = num_gpus // (replicas or 1)
    elif given:
        group = math.prod(given)
    else:
        raise ValidationError("gpus", "is required when --layout gives no cfg/ulysses/ring degree")
    layout = _layout(planner, group, spec)
    if spec.get("offload") and layout.world_size > 1:
        raise ValidationError("layout", "offload=true is one GPU's --offload (a group offloads FSDP shards, "
                                        "which the cost model does not price); use replicas of 1-GPU groups")
    if spec.get("vae") == "parallel" and layout.world_size == 1:
        raise ValidationError("layout", "vae=parallel splits the decode over a group's GPUs: the group has one")
    return planner.fused(layout, replicas or 1, offload=bool(spec.get("offload", False)), vae=spec.get("vae"))


def _layout(planner, nproc: int, spec: dict):
    from relay.parallel.layout import LayoutError, ParallelLayout

    try:
        layout = ParallelLayout.from_flags(nproc=nproc, ulysses=spec.get("ulysses"), ring=spec.get("ring"),
                                           cfg=spec.get("cfg"), fsdp=spec.get("fsdp"))
        work = planner.work
        layout.check_model(num_heads=work.model.heads,
                           guidance_needs_uncond=any(g > 1 for g in work.guidance.values()))
    except LayoutError as exc:
        key = _FLAG_OF.get(exc.field, exc.field)
        raise ValidationError("layout", f"{key}: {exc.message} (group of {nproc} GPUs)") from None
    return layout


def _staged(planner, spec: dict, num_gpus: int | None):
    from relay.parallel.cost import HIGH, LOW

    if spec.get("offload") or spec.get("vae"):
        raise ValidationError("layout", "offload and vae apply to fused placements (a staged low-noise group of "
                                        "several GPUs splits its decode)")
    if planner.work.model.num_experts < 2:
        name = planner.work.model.name
        raise ValidationError("layout", f"placement=staged needs a two-expert model; {name} is dense")
    replicas, split = spec.get("replicas"), spec.get("split")
    if split is not None:
        pipeline = sum(split)
    elif num_gpus is not None:
        pipeline = num_gpus // (replicas or 1)
    else:
        raise ValidationError("gpus", "is required with placement=staged and no split")
    count = replicas or (num_gpus // pipeline if num_gpus else 1)
    if num_gpus is not None and count * pipeline != num_gpus:
        raise ValidationError("layout", f"a {pipeline}-GPU pipeline x {count} replicas is not --gpus {num_gpus}")
    if split is None:
        try:
            chosen = planner.split(pipeline)
        except ValueError as exc:
            raise ValidationError("layout", f"no staged split of {pipeline} GPUs fits: {exc}") from None
        split, reason = (chosen.high_devices, chosen.low_devices), chosen.reason
    else:
        reason = f"{split[0]}:{split[1]} as given"
    groups = []
    for n, role in zip(split, (HIGH, LOW), strict=True):
        if any(k in spec for k in ("cfg", "ulysses", "ring", "fsdp")):
            groups.append(_layout(planner, n, spec))
        else:
            groups.append((planner.best_group(n, role) or planner.best_group(n, role, must_fit=False)).layout)
    return planner.staged(groups[0], groups[1], count, reason)


def _table(planner, ranked, shown, num_gpus: int, rank_by: str) -> str:
    from relay.parallel.plan import explain

    work, gpu = planner.work, planner.gpu
    steps = " + ".join(f"{n} {e.replace('_', '-')}" for e, n in work.expert_steps.items())
    cfg = ", ".join(f"{e.split('_')[0]} {g:g}" for e, g in work.guidance.items())
    link = f"NVLink {gpu.nvlink_gbs:g} GB/s" if gpu.nvlink_gbs else f"PCIe {gpu.pcie_gbs:g} GB/s"
    fits = sum(p.feasible for p in ranked)
    lines = [
        (f"{work.model.name} {work.width}x{work.height}, {work.frames} frames, {work.steps} steps ({steps}), "
         f"guidance {cfg}; {work.tokens:,} tokens"),
        (f"{num_gpus} x {gpu.name} ({gpu.description}: {gpu.bf16_tflops:g} TFLOP/s bf16, {gpu.memory_gb:g} GB, "
         f"{gpu.memory_bandwidth_gbs:g} GB/s, {link} per direction)"),
        (f"{len(ranked)} layout(s) priced, {fits} fit; ranked by "
         f"{'requests per hour' if rank_by == 'throughput' else 'seconds per video'}"),
        "",
        f"{'#':>3}  {'layout':<42} {'placement':<14} {'s/video':>9} {'req/h':>8} {'mem/GPU GB':>11}  fits",
    ]
    for i, p in enumerate(shown, 1):
        lines.append(f"{i:>3}  {p.describe():<42} {p.placement_label():<14} {p.seconds_per_video:>9.1f} "
                     f"{p.requests_per_hour:>8.1f} {p.memory_gib:>11.1f}  {'yes' if p.feasible else 'no'}")
    lines += ["", "why #1: " + explain(ranked, gpu, rank_by)]
    return "\n".join(lines)
