"""What to tell a user who ran out of memory: the planner's figures for what they asked, and
the layouts that fit.

The scheduler fails a request that ran out of memory at once (:mod:`engine.scheduler`) and asks
its executor's ``advise`` hook -- :func:`request_advice` -- what may fit instead; the executor
asks :func:`load_advice` when a group runs out of memory while loading. Both price layouts with
the planner (:mod:`parallel.plan`) when the model folder is one of the catalog's models (matched
by its transformer's shape) and the device is a GPU; otherwise they give the general advice.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: What may fit, whatever the model: every knob that lowers the peak of a rank.
GENERAL = ("What may fit: a smaller size or fewer frames; --fsdp N (shards the experts over N "
           "ranks); --offload (idle weights wait in host memory); more ranks (--ulysses / --ring "
           "split the video's tokens); --text-encoder cpu.")
#: The transformer config keys that identify a catalog model.
_SHAPE = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels")


def catalog_model(info):
    """The catalog model whose transformer has the shape of ``info``'s (same family and kind),
    or ``None`` (a tiny or unknown model)."""
    from relay.parallel.catalog import models

    config = info.transformer_config or {}
    for model in models().values():
        if model.family == info.family and model.kind == info.kind and all(
                model.transformer.get(k) == config.get(k) for k in _SHAPE):
            return model
    return None


def nearest_gpu(total_bytes: int | None):
    """The catalog GPU whose memory is nearest ``total_bytes`` (``None`` when unknown)."""
    from relay.parallel.catalog import gpus

    if not total_bytes:
        return None
    return min(gpus().values(), key=lambda g: abs(g.memory_gb * 1e9 - total_bytes))


def _role(roles) -> str:
    from relay.engine.experts import HIGH, LOW
    from relay.parallel.plan import FUSED

    experts = [r for r in roles if r in (HIGH, LOW)]
    return experts[0] if len(experts) == 1 else FUSED


def _planner(model, request: dict, total_bytes: int | None):
    from relay.parallel.cost import load_calibration, make_workload
    from relay.parallel.plan import Planner

    gpu = nearest_gpu(total_bytes)
    if gpu is None:
        return None
    work = make_workload(model, width=request.get("width"), height=request.get("height"),
                         frames=request.get("frames"), steps=request.get("steps"))
    return Planner(work, gpu, load_calibration())


def _fits(planner, role: str, ranks: int, layout, vae: str = "whole") -> list[str]:
    """Alternatives that fit, cheapest first: this group splitting its decode (``--vae-parallel``),
    with FSDP over its ranks, with offload, then the fastest fitting group of 2x and 4x the ranks
    (with the split decode)."""
    from relay.parallel.layout import ParallelLayout

    out = []
    capacity = planner.capacity_gib
    if ranks > 1 and vae != "parallel" and role in ("fused", "low_noise", "dense"):
        peak = planner.group(layout, role, vae="parallel").memory.peak_gib
        if peak <= capacity:
            out.append(f"--vae-parallel ({peak:.1f} GiB)")
    if ranks > 1 and layout.fsdp_degree < ranks:
        sharded = ParallelLayout(cfg_degree=layout.cfg_degree, ulysses_degree=layout.ulysses_degree,
                                 ring_degree=layout.ring_degree, fsdp_degree=ranks)
        peak = planner.group(sharded, role, vae=vae).memory.peak_gib
        if peak <= capacity:
            out.append(f"--fsdp {ranks} ({peak:.1f} GiB)")
    offloaded = planner.group(layout, role, offload=True, vae=vae).memory.peak_gib
    if offloaded <= capacity:
        out.append(f"--offload ({offloaded:.1f} GiB)")
    for more in (2 * ranks, 4 * ranks):
        best = planner.best_group(more, role)
        if best is not None:
            out.append(f"{more} ranks as {best.describe()}{' (--vae-parallel)' if best.vae == 'parallel' else ''} "
                       f"({best.memory.peak_gib:.1f} GiB)")
            break
    return out


def _priced(model, request: dict, roles, layout, oom, vae: str = "whole") -> str | None:
    if not str(oom.device).startswith("cuda"):
        return None
    planner = _planner(model, request, oom.total_bytes)
    if planner is None:
        return None
    role = _role(roles)
    ranks = layout.world_size
    peak = planner.group(layout, role, vae=vae).memory.peak_gib
    text = (f"The planner puts this layout at {peak:.1f} GiB per rank on a {planner.gpu.name} "
            f"({planner.capacity_gib:.1f} GiB usable) for {model.name} at "
            f"{planner.work.width}x{planner.work.height}, {planner.work.frames} frames.")
    fits = _fits(planner, role, ranks, layout, vae)
    if fits:
        text += " What fits: " + "; ".join(fits) + "."
    text += (f" `relay plan --gpu {planner.gpu.name} --model {model.name} --size "
             f"{planner.work.width}x{planner.work.height} --frames {planner.work.frames}` ranks every layout.")
    return text


def request_advice(model_dir: str, request: dict, group: dict, oom) -> str:
    """The advice for a request that ran out of memory on ``group`` (its ``describe()``)."""
    from relay.engine.model_info import read_model_info
    from relay.parallel.layout import ParallelLayout

    info = read_model_info(model_dir)
    model = catalog_model(info)
    layout = ParallelLayout.from_spec(group.get("layout") or "")
    priced = None
    if model is not None:
        try:
            priced = _priced(model, request, group.get("roles", ()), layout, oom, group.get("vae", "whole"))
        except Exception:  # noqa: BLE001 - a size the planner cannot price still gets the advice
            log.debug("no planner figure for this request", exc_info=True)
    if priced is None:
        why = ("this rank ran on the host" if not str(oom.device).startswith("cuda")
               else "this model is not one of the catalog's")
        return f"{GENERAL} (No planner figures: {why}.)"
    return f"{priced} {GENERAL}"


def load_advice(model_dir: str, roles, layout, oom, *, offload: bool, text_encoder: str) -> str:
    """The advice for a group that ran out of memory while loading (host or device)."""
    from relay.engine.model_info import read_model_info

    info = read_model_info(model_dir)
    model = catalog_model(info)
    tips = []
    if not offload:
        tips.append("--offload")
    if layout.world_size > 1 and layout.fsdp_degree < layout.world_size:
        tips.append(f"--fsdp {layout.world_size}")
    if text_encoder == "device":
        tips.append("--text-encoder cpu")
    tips.append("more ranks with --fsdp")
    size = ""
    if model is not None:
        expert_gib = model.expert_params * 2 / 2**30  # bf16
        te_gib = model.text_encoder.params * model.text_encoder.dtype_bytes / 2**30
        size = (f" {model.name}: {expert_gib:.1f} GiB per expert in bf16, text encoder "
                f"{te_gib:.1f} GiB.")
    where = "host memory" if not str(oom.device).startswith("cuda") else "device memory"
    return f"Out of {where} while loading.{size} What may fit: {', '.join(tips)}."
