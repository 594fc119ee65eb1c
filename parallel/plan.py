"""Layout planner: enumerates the ways to run a Wan 2.2 model on N GPUs, prices each with
:mod:`parallel.cost`, and ranks them by seconds per video or by throughput (``relay plan``).

A *plan* is a placement of replicas of one group shape:

* **fused**: a group of ``g`` GPUs holds every expert and runs whole requests; ``N / g`` replicas
  serve requests side by side (throughput x replicas, latency unchanged).
* **staged**: a pipeline of a high-noise group and a low-noise group, sized with
  :func:`engine.stages.propose_split` from this cost model's step time; the high group encodes and
  runs the high-noise steps, hands the denoise state over, and the low group runs the low-noise
  steps and decodes, so request ``k+1``'s high-noise steps overlap request ``k``'s low-noise ones.
  Latency = high stage + hand-off + low stage; throughput = 1 / slower stage.

Each group's layout is ``cfg x ulysses x ring`` (Ulysses dividing the heads) with FSDP over none,
the sequence-parallel ranks, or the whole group (:class:`parallel.layout.ParallelLayout`). A plan
is infeasible when a rank's predicted peak memory exceeds the GPU's. :func:`fit_calibration`
fits the model's two free constants to the 4-GPU rows of the published Wan 2.2 table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from relay.parallel import cost
from relay.parallel.cost import DENSE, HIGH, LOW, Calibration, GpuSpec, MemoryUse, Workload
from relay.parallel.layout import ParallelLayout

FUSED, STAGED = "fused", "staged"


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    """One worker group of a plan: its role, layout and per-rank cost."""

    role: str
    layout: ParallelLayout
    offload: bool
    step_s: dict[str, float]
    memory: MemoryUse
    vae: str = "whole"

    def degrees(self) -> dict[str, int]:
        """``{"cfg", "ulysses", "ring", "fsdp"}`` degrees (the ``--layout`` keys)."""
        lay = self.layout
        return {"cfg": lay.cfg_degree, "ulysses": lay.ulysses_degree, "ring": lay.ring_degree,
                "fsdp": lay.fsdp_degree}

    def describe(self) -> str:
        """``ulysses=4 cfg=2 fsdp=8``: the degrees above 1, in ``--layout`` spelling."""
        parts = [f"{k}={v}" for k, v in self.degrees().items() if v > 1 and k != "cfg"]
        if self.layout.cfg_degree > 1:
            parts.insert(1 if self.layout.ulysses_degree > 1 else 0, f"cfg={self.layout.cfg_degree}")
        parts += ["offload"] if self.offload else []
        parts += {"parallel": ["vae-parallel"], "tiled": ["vae-tiling"]}.get(self.vae, [])
        return " ".join(parts) or "single"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A priced placement: groups, replicas, seconds per video, throughput, memory, breakdown.

    Attributes:
        placement: ``fused`` or ``staged``.
        groups: One group (fused) or the high-noise and low-noise groups (staged).
        replicas: Copies of the group (or pipeline) serving requests side by side.
        seconds_per_video: Latency of one request on an idle plan.
        period_s: Seconds between finished requests of one replica when busy (the slower stage).
        breakdown: Seconds of one request by kind: ``compute``, ``comm`` (not hidden),
            ``encode``, ``decode``, ``offload``, ``handoff``.
        memory_gib: Predicted peak memory of the busiest rank.
        capacity_gib: The GPU memory a plan may use (``usable_memory_fraction`` of it).
        stage_s: Staged only: seconds of the high and the low stage.
        split_reason: Staged only: why this split (:func:`engine.stages.propose_split`).
    """

    placement: str
    groups: tuple[GroupPlan, ...]
    replicas: int
    seconds_per_video: float
    period_s: float
    breakdown: dict[str, float]
    memory_gib: float
    capacity_gib: float
    stage_s: tuple[float, float] | None = None
    split_reason: str | None = None

    @property
    def gpus(self) -> int:
        """GPUs used by all replicas."""
        return self.replicas * sum(g.layout.world_size for g in self.groups)

    @property
    def requests_per_hour(self) -> float:
        """Finished videos per hour with every replica busy."""
        return self.replicas * 3600.0 / self.period_s

    @property
    def feasible(self) -> bool:
        """Whether the busiest rank fits in the GPU's memory."""
        return self.memory_gib <= self.capacity_gib

    def describe(self) -> str:
        """The layout column: the group's degrees, or ``high: ... | low: ...``."""
        if self.placement == FUSED:
            return self.groups[0].describe()
        return " | ".join(f"{g.role.split('_')[0]}: {g.describe()}" for g in self.groups)

    def placement_label(self) -> str:
        """``fused``, ``staged 5:3``, with ``x2`` for replicas."""
        label = self.placement
        if self.placement == STAGED:
            label += " " + ":".join(str(g.layout.world_size) for g in self.groups)
        return label + (f" x{self.replicas}" if self.replicas > 1 else "")

    def as_dict(self) -> dict:
        """Machine-readable form (``relay plan --json``). ``degrees`` is the group's
        ``{cfg, ulysses, ring, fsdp}`` for a fused plan and ``{high_noise: {...}, low_noise: {...}}``
        for a staged one."""
        degrees = (self.groups[0].degrees() if self.placement == FUSED
                   else {g.role: g.degrees() for g in self.groups})
        split = None
        if self.stage_s is not None:
            high, low = (g.layout.world_size for g in self.groups)
            split = {"high_devices": high, "low_devices": low, "flag": f"{high}:{low}",
                     "high_stage_s": round(self.stage_s[0], 3), "low_stage_s": round(self.stage_s[1], 3),
                     "reason": self.split_reason}
        return {
            "layout": self.describe(), "degrees": degrees, "placement": self.placement,
            "stage_split": split, "replicas": self.replicas, "gpus": self.gpus,
            "offload": any(g.offload for g in self.groups),
            "seconds_per_video": round(self.seconds_per_video, 3),
            "requests_per_hour": round(self.requests_per_hour, 3),
            "peak_memory_gb": round(self.memory_gib, 2), "feasible": self.feasible,
            "breakdown": {k: round(v, 3) for k, v in self.breakdown.items()},
            "groups": [{"role": g.role, "gpus": g.layout.world_size, "degrees": g.degrees(),
                        "offload": g.offload, "vae": g.vae,
                        "seconds_per_step": {k: round(v, 4) for k, v in g.step_s.items()},
                        "peak_memory_gb": round(g.memory.peak_gib, 2)} for g in self.groups],
        }


class Planner:
    """Prices plans of one workload on one GPU kind (caches the best group per size and role)."""

    def __init__(self, work: Workload, gpu: GpuSpec, cal: Calibration) -> None:
        self.work, self.gpu, self.cal = work, gpu, cal
        self.capacity_gib = gpu.memory_gb * cal.usable_memory_fraction
        self._best: dict[tuple[int, str, bool], GroupPlan | None] = {}

    def group(self, layout: ParallelLayout, role: str, *, offload: bool = False,
              text_encoder: str | None = None, vae: str | None = None) -> GroupPlan:
        """Prices a group; ``role`` is ``fused`` (every expert, whole requests) or its expert.

        The group that encodes holds the text encoder sharded when it uses FSDP, whole otherwise.
        The group that decodes splits the decode by rows over its ranks when it has several
        (``vae`` ``None``; ``--vae-parallel``), else decodes whole frames; ``vae`` forces a mode
        of :data:`parallel.cost.VAE_MODES`.
        """
        experts = tuple(self.work.expert_steps) if role == FUSED else (role,)
        if text_encoder is None:
            encodes = role in (FUSED, HIGH, DENSE)
            text_encoder = ("sharded" if layout.fsdp_degree > 1 else "device") if encodes else "none"
        decodes = role in (FUSED, LOW, DENSE)
        if vae is None:
            splits = "vae_parallel" in self.family_parallel
            vae = "parallel" if decodes and layout.world_size > 1 and splits else "whole"
        memory = cost.memory_use(self.work, self.cal, layout, experts=len(experts), text_encoder=text_encoder,
                                 decodes=decodes, offload=offload, vae=vae)
        steps = {e: cost.step_cost(self.work, self.gpu, self.cal, layout, e).total_s for e in experts}
        return GroupPlan(role=role, layout=layout, offload=offload, step_s=steps, memory=memory,
                         vae=vae if decodes else "whole")

    def _breakdown(self, groups: tuple[GroupPlan, ...]) -> dict[str, float]:
        out = {"compute": 0.0, "comm": 0.0}
        for g in groups:
            for expert in g.step_s:
                c = cost.step_cost(self.work, self.gpu, self.cal, g.layout, expert)
                out["compute"] += self.work.expert_steps[expert] * c.compute_s
                out["comm"] += self.work.expert_steps[expert] * c.comm_s
        first = groups[0]
        sharded = first.layout.fsdp_degree > 1 and first.memory.text_encoder_gib > 0
        out["encode"] = cost.encode_seconds(self.work, self.gpu, self.cal, group=first.layout.world_size,
                                            text_sharded=sharded)
        decoder = groups[-1]
        out["decode"] = cost.decode_seconds(self.work, self.gpu, self.cal, ranks=decoder.layout.world_size,
                                            mode=decoder.vae)
        out["offload"] = cost.offload_seconds(self.work, self.gpu, self.cal) if first.offload else 0.0
        return out

    def fused(self, layout: ParallelLayout, replicas: int = 1, *, offload: bool = False,
              text_encoder: str | None = None, vae: str | None = None) -> Plan:
        """``replicas`` groups laid out as ``layout``, each holding every expert."""
        g = self.group(layout, FUSED, offload=offload, text_encoder=text_encoder, vae=vae)
        out = self._breakdown((g,))
        latency = sum(out.values())
        return Plan(placement=FUSED, groups=(g,), replicas=replicas, seconds_per_video=latency,
                    period_s=latency, breakdown=out, memory_gib=g.memory.peak_gib,
                    capacity_gib=self.capacity_gib)

    def staged(self, high: ParallelLayout, low: ParallelLayout, replicas: int = 1,
               reason: str | None = None) -> Plan:
        """``replicas`` pipelines of a high-noise group and a low-noise group."""
        gh, gl = self.group(high, HIGH), self.group(low, LOW)
        out = self._breakdown((gh, gl))
        out["handoff"] = cost.handoff_seconds(self.work, self.gpu, self.cal, high.world_size + low.world_size)
        high_s = out["encode"] + self.work.expert_steps[HIGH] * gh.step_s[HIGH]
        low_s = out["handoff"] + self.work.expert_steps[LOW] * gl.step_s[LOW] + out["decode"]
        return Plan(placement=STAGED, groups=(gh, gl), replicas=replicas, seconds_per_video=high_s + low_s,
                    period_s=max(high_s, low_s), breakdown=out,
                    memory_gib=max(gh.memory.peak_gib, gl.memory.peak_gib), capacity_gib=self.capacity_gib,
                    stage_s=(high_s, low_s), split_reason=reason)

    def layouts(self, n: int) -> list[ParallelLayout]:
        """Every valid layout of a group of ``n`` GPUs for this model: CFG 1 or 2 (when some step
        runs an unconditional forward), Ulysses dividing the heads, ring the rest, FSDP over none,
        the sequence-parallel ranks or the group."""
        needs_uncond = any(self.work.forwards_per_step(e) > 1 for e in self.work.expert_steps)
        supported = self.family_parallel
        out = []
        for cfg in (1, 2):
            if cfg == 2 and (n % 2 or not needs_uncond or "cfg_parallel" not in supported):
                continue
            sp = n // cfg
            for ulysses in (u for u in _divisors(sp) if self.work.model.heads % u == 0):
                if (ulysses > 1 and "ulysses" not in supported) or (sp // ulysses > 1 and "ring" not in supported):
                    continue
                for fsdp in sorted({1, sp, n}):
                    if fsdp > 1 and "fsdp" not in supported:
                        continue
                    out.append(ParallelLayout(cfg_degree=cfg, ulysses_degree=ulysses,
                                              ring_degree=sp // ulysses, fsdp_degree=fsdp))
        return out

    @property
    def family_parallel(self) -> frozenset[str]:
        """The layout flags the model's family runs (its spec's ``parallel``)."""
        from relay.engine.models import get_spec

        return get_spec(self.work.model.family).parallel

    def best_group(self, n: int, role: str, *, must_fit: bool = True) -> GroupPlan | None:
        """The fastest group of ``n`` GPUs for ``role`` (that fits in memory, unless not ``must_fit``)."""
        key = (n, role, must_fit)
        if key not in self._best:
            groups = [self.group(lay, role) for lay in self.layouts(n)]
            if must_fit:
                groups = [g for g in groups if g.memory.peak_gib <= self.capacity_gib]
            self._best[key] = min(groups, key=lambda g: (sum(g.step_s.values()), g.memory.peak_gib), default=None)
        return self._best[key]

    def split(self, n: int):
        """Sizes the stage groups of an ``n``-GPU pipeline with :func:`engine.stages.propose_split`:
        ``step_time`` is the step time of the fastest fitting group of each size, and a size is
        allowed when a group of it fits in memory in either role.

        Raises:
            ValueError: no split where both groups fit.
        """
        from relay.engine.stages import propose_split

        def step_time(k: int) -> float:
            best = self.best_group(k, HIGH)
            return best.step_s[HIGH] if best else math.inf

        def allowed(k: int) -> bool:
            return self.best_group(k, HIGH) is not None and self.best_group(k, LOW) is not None

        steps = self.work.expert_steps
        ratio = self.work.forwards_per_step(LOW) / self.work.forwards_per_step(HIGH)
        return propose_split(n, steps[HIGH], steps[LOW] if ratio == 1 else steps[LOW] * ratio,
                             step_time=step_time, allowed=allowed)

    def enumerate(self, num_gpus: int) -> list[Plan]:
        """Every fused plan (plus single-GPU ``--offload`` where one GPU cannot hold the model)
        and the best staged plan of every pipeline size dividing ``num_gpus``."""
        plans = []
        for g in _divisors(num_gpus):
            replicas = num_gpus // g
            for layout in self.layouts(g):
                plan = self.fused(layout, replicas)
                plans.append(plan)
                if not plan.feasible and g == 1:  # relay generate --offload (one GPU only)
                    plans.append(self.fused(layout, replicas, offload=True))
                    if not plans[-1].feasible:  # and --vae-tiling, when the decode is what does not fit
                        plans.append(self.fused(layout, replicas, offload=True, vae="tiled"))
            if self.work.model.num_experts > 1 and g >= 2:
                try:
                    s = self.split(g)
                except ValueError:
                    continue
                high, low = self.best_group(s.high_devices, HIGH), self.best_group(s.low_devices, LOW)
                plans.append(self.staged(high.layout, low.layout, replicas, s.reason))
        return plans


def rank(plans: list[Plan], by: str = "latency") -> list[Plan]:
    """Feasible plans first, then by seconds per video (``latency``) or req/h (``throughput``)."""
    if by == "throughput":
        return sorted(plans, key=lambda p: (not p.feasible, -p.requests_per_hour, p.seconds_per_video, p.gpus))
    return sorted(plans, key=lambda p: (not p.feasible, p.seconds_per_video, -p.requests_per_hour, p.gpus))


def explain(plans: list[Plan], gpu: GpuSpec, by: str = "latency") -> str:
    """Why the first of ``plans`` (ranked ``by`` latency or throughput) wins: its dominant cost,
    communication share, memory, near-ties and runner-up (or, when nothing fits, what takes
    the memory)."""
    top = plans[0]
    if not top.feasible:
        low = min(plans, key=lambda p: p.memory_gib)
        mem = max((g.memory for g in low.groups), key=lambda m: m.peak_gib)
        parts = {"expert parameters": mem.params_gib, "text encoder": mem.text_encoder_gib,
                 "activations": mem.activations_gib + mem.fsdp_buffers_gib, "VAE decode workspace": mem.decode_gib}
        big = max(parts, key=parts.get)
        return (f"no layout fits: the smallest peak is {low.memory_gib:.1f} GB per GPU ({low.describe()}) "
                f"against {low.capacity_gib:.0f} usable of {gpu.memory_gb:g} GB, {parts[big]:.1f} GB of it the {big}; "
                + ("more GPUs shard it further" if big != "VAE decode workspace"
                   else "--vae-parallel splits it over a group's GPUs; on one GPU a smaller size or a larger GPU"))
    b = top.breakdown
    total = sum(b.values())
    dominant = max(b, key=b.get)
    words = {"compute": "transformer compute", "comm": "communication", "encode": "encoding",
             "decode": "VAE decode", "offload": "host-to-GPU copies", "handoff": "the stage hand-off"}
    text = (f"{top.describe()} ({top.placement_label()}): {top.seconds_per_video:.1f} s per video and "
            f"{top.requests_per_hour:.1f} req/h on {top.gpus} GPUs; {words[dominant]} "
            f"{b[dominant] / total:.0%} of it, communication not hidden "
            f"{b['comm'] / total:.0%}, VAE decode {b['decode'] / total:.0%}; peak {top.memory_gib:.1f} GB per "
            f"GPU of {top.capacity_gib:.0f} usable ({gpu.memory_gb:g} GB).")
    if top.split_reason:
        text += f" Stage split: {top.split_reason}."
    rest = [p for p in plans[1:] if p.feasible]
    if by == "throughput":
        close = sum(p.requests_per_hour >= top.requests_per_hour / 1.02 for p in rest)
    else:
        close = sum(p.seconds_per_video <= 1.02 * top.seconds_per_video for p in rest)
    if close:
        text += f" {close} other layout(s) within 2%: the model cannot separate them; prefer the simplest."
    if rest:
        nxt = rest[0]
        text += (f" Next: {nxt.describe()} ({nxt.placement_label()}), {nxt.seconds_per_video:.1f} s, "
                 f"{nxt.requests_per_hour:.1f} req/h.")
    return text


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, kw_only=True)
class ReferenceRow:
    """One row of the published Wan 2.2 table (``calibration.json`` ``reference_table``)."""

    gpu: str
    model: str
    width: int
    height: int
    gpus: int
    seconds: float
    peak_gb: float


def reference_rows(gpus: int | None = None) -> list[ReferenceRow]:
    """The published rows (all, or those run on ``gpus`` GPUs)."""
    rows = []
    for gpu, model, size, n, seconds, peak in cost.calibration_data()["reference_table"]["rows"]:
        width, height = (int(v) for v in size.split("x"))
        rows.append(ReferenceRow(gpu=gpu, model=model, width=width, height=height, gpus=n,
                                 seconds=seconds, peak_gb=peak))
    return [r for r in rows if gpus is None or r.gpus == gpus]


_WORKLOADS: dict[tuple[str, int, int], Workload] = {}


def reference_plan(row: ReferenceRow, cal: Calibration) -> Plan:
    """The plan the published run used: 81 frames, 40 steps; on several GPUs Ulysses over all
    of them, FSDP over all of them, the text encoder sharded, CFG not parallel; on one GPU, offload."""
    key = (row.model, row.width, row.height)
    if key not in _WORKLOADS:
        _WORKLOADS[key] = cost.make_workload(cost.find_model(row.model), width=row.width,
                                             height=row.height, frames=81, steps=40)
    planner = Planner(_WORKLOADS[key], cost.find_gpu(row.gpu), cal)
    if row.gpus == 1:
        return planner.fused(ParallelLayout(), offload=True)
    # The official runs decode on rank 0 alone.
    return planner.fused(ParallelLayout(ulysses_degree=row.gpus, fsdp_degree=row.gpus), text_encoder="sharded",
                         vae="whole")


def prediction_errors(cal: Calibration, gpus: int) -> list[tuple[ReferenceRow, float, float]]:
    """``(row, predicted seconds, relative error)`` for the published rows on ``gpus`` GPUs."""
    out = []
    for row in reference_rows(gpus):
        predicted = reference_plan(row, cal).seconds_per_video
        out.append((row, predicted, predicted / row.seconds - 1))
    return out


def fit_calibration(cal: Calibration | None = None, *, gpus: int = 4) -> dict[str, float]:
    """Fits ``tensor_efficiency`` and ``elementwise_bytes`` to the published rows on ``gpus`` GPUs.

    Gauss-Newton on the relative errors, parametrised by ``1 / tensor_efficiency`` and
    ``elementwise_bytes`` (in which the model is linear except where FSDP gathers outlast compute),
    from a fixed start, so the result is deterministic. Every other constant comes from ``cal``.

    Returns:
        ``{"tensor_efficiency": ..., "elementwise_bytes": ...}`` rounded to 6 significant digits.
    """
    cal = cal or cost.load_calibration()
    rows = reference_rows(gpus)
    theta = [2.0, 500.0]

    def residuals(t: list[float]) -> list[float]:
        trial = replace(cal, tensor_efficiency=1 / t[0], elementwise_bytes=t[1])
        return [reference_plan(r, trial).seconds_per_video / r.seconds - 1 for r in rows]

    for _ in range(50):
        r = residuals(theta)
        jac = []
        for i in range(2):
            bumped = list(theta)
            bumped[i] *= 1 + 1e-6
            jac.append([(b - a) / (theta[i] * 1e-6) for a, b in zip(r, residuals(bumped), strict=True)])
        # Normal equations of the 2-parameter least-squares step.
        a11, a12, a22 = (sum(x * y for x, y in zip(jac[i], jac[j], strict=True)) for i, j in ((0, 0), (0, 1), (1, 1)))
        g1, g2 = (sum(x * y for x, y in zip(jac[i], r, strict=True)) for i in (0, 1))
        det = a11 * a22 - a12 * a12
        step = ((a22 * g1 - a12 * g2) / det, (a11 * g2 - a12 * g1) / det)
        theta = [theta[0] - step[0], theta[1] - step[1]]
        if abs(step[0]) < 1e-12 * abs(theta[0]) and abs(step[1]) < 1e-9 * abs(theta[1]):
            break
    return {"tensor_efficiency": float(f"{1 / theta[0]:.6g}"), "elementwise_bytes": float(f"{theta[1]:.6g}")}


def write_calibration() -> dict[str, float]:
    """Refits on the 4-GPU rows and rewrites ``fitted`` in ``data/calibration.json``."""
    import json
    import re

    fitted = fit_calibration()
    cal = replace(cost.load_calibration(), **fitted)
    path = cost.DATA_DIR / "calibration.json"
    text = path.read_text()
    for key, value in fitted.items():
        text = re.sub(rf'("{key}": )[-0-9.e+]+', rf"\g<1>{value!r}", text, count=1)
    errors = {f"{r.gpu} {r.model} {r.width}x{r.height}": round(e, 4) for r, _, e in prediction_errors(cal, 4)}
    text = re.sub(r'("fit_errors_4gpu": )\{[^}]*\}', lambda m: m.group(1) + json.dumps(errors), text, count=1)
    path.write_text(text)
    cost.load_calibration.cache_clear()
    return fitted


if __name__ == "__main__":  # python -m relay.parallel.plan --refit
    import sys

    if sys.argv[1:] != ["--refit"]:
        sys.exit("usage: python -m relay.parallel.plan --refit   (refits data/calibration.json on the 4-GPU rows)")
    print(write_calibration())
