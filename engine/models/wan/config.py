"""A Wan 2.x diffusers folder read from its JSON configs alone (no weights are opened).

Defaults respect the folder, as diffusers' own pipelines do: the flow shift comes from
``scheduler/scheduler_config.json`` and the expert boundary from ``model_index.json``; a
``relay.json`` in the folder (``{"defaults": {...}}``) may override either; the Wan 2.2 reference
table (:data:`PRESETS`) fills only what a folder cannot say (steps, guidance, size, frames, fps).
Every default carries its source, so ``relay generate`` can say where each setting came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from relay.engine.errors import ModelError
from relay.engine.model_info import Defaults, ModelInfo

FAMILY = "wan2.2"
#: The ``model_index.json`` pipeline classes of Wan folders.
PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline")
KINDS = ("t2v", "i2v", "ti2v")

#: Reference settings of the Wan 2.2 release for each kind (official repo's configs). The shift
#: is used only when the folder's scheduler config has no ``flow_shift``; the boundary of a
#: folder always comes from its ``model_index.json`` (the planner prices catalog models with these).
PRESETS: dict[str, Defaults] = {
    "t2v": Defaults(height=720, width=1280, frames=81, steps=40, shift=12.0, boundary=0.875,
                    guidance=4.0, guidance_low=3.0, fps=16),
    "i2v": Defaults(height=720, width=1280, frames=81, steps=40, shift=5.0, boundary=0.9,
                    guidance=3.5, guidance_low=3.5, fps=16),
    "ti2v": Defaults(height=704, width=1280, frames=121, steps=50, shift=5.0, boundary=None,
                     guidance=5.0, guidance_low=None, fps=24),
}

#: Named recipes a request may ask for (``preset``): the fields each sets, where a request's own
#: fields win. ``lightning``: the 4-step Wan 2.2 Lightning distill recipe -- flow-match Euler at
#: the distilled timesteps 1000, 750, 500, 250 under shift 5 (1000, 937.5, 833.3, 625: the
#: timesteps the LoRAs were trained on), guidance 1 on both experts (ModelTC/Wan2.2-Lightning and
#: its LightX2V release notes). The experts still switch at the folder's boundary: with these
#: timesteps T2V (0.875) and I2V (0.9) run two high-noise and two low-noise steps.
RECIPES: dict[str, dict] = {
    "lightning": {"solver": "euler", "steps": 4, "timesteps": (1000.0, 750.0, 500.0, 250.0),
                  "shift": 5.0, "guidance": 1.0, "guidance_low": 1.0},
}
RECIPE_SOURCES = {"lightning": "preset lightning (ModelTC/Wan2.2-Lightning)"}

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
RELAY_JSON = "relay.json"


def read_json(path: Path) -> dict:
    """A component config; a missing or broken file is a :class:`ModelError` naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: not a diffusers Wan model directory") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None


def _component(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and value[0] is not None


def read_info(path: Path, index: dict) -> ModelInfo:
    """Classifies a Wan folder (T2V / I2V MoE, dense TI2V) and resolves its defaults.

    Raises:
        ModelError: the folder is incomplete or not a Wan 2.x layout.
    """
    experts = tuple(name for name in ("transformer", "transformer_2") if _component(index, name))
    if not experts:
        raise ModelError(f"{path}/model_index.json names no transformer")
    tconf = read_json(path / experts[0] / "config.json")
    vconf = read_json(path / "vae" / "config.json")
    sconf = read_json(path / SCHEDULER_CONFIG)
    expand = bool(index.get("expand_timesteps", False))
    boundary = index.get("boundary_ratio") if len(experts) == 2 else None
    if len(experts) == 2 and boundary is None:
        raise ModelError(f"{path}: two transformers but no boundary_ratio in model_index.json")
    z_dim = int(vconf.get("z_dim", 16))
    in_channels = int(tconf.get("in_channels", 16))
    if expand:
        kind = "ti2v"
    elif in_channels == z_dim:
        kind = "t2v"
    elif in_channels == 2 * z_dim + 4:
        kind = "i2v"
    else:
        raise ModelError(f"{path}: transformer in_channels={in_channels} fits no Wan kind (z_dim={z_dim})")
    patch = tuple(int(p) for p in tconf.get("patch_size", (1, 2, 2)))
    vae_spatial = int(vconf.get("scale_factor_spatial") or 8)
    extra = read_json(path / RELAY_JSON) if (path / RELAY_JSON).exists() else {}
    values, sources = _defaults(kind, sconf, extra, boundary)
    return ModelInfo(
        path=path, family=FAMILY, kind=kind, experts=experts,
        boundary_ratio=float(boundary) if boundary is not None else None,
        expand_timesteps=expand, spatial_multiple=vae_spatial * patch[1], vae_spatial=vae_spatial,
        temporal_stride=int(vconf.get("scale_factor_temporal") or 4), patch_size=patch,
        z_dim=z_dim, in_channels=in_channels,
        num_attention_heads=int(tconf.get("num_attention_heads", 40)),
        num_train_timesteps=int(sconf.get("num_train_timesteps", 1000)),
        scheduler_class=str(sconf.get("_class_name", "UniPCMultistepScheduler")),
        image_dim=tconf.get("image_dim"), tiny=bool(extra.get("tiny", False)),
        defaults=values, default_sources=sources,
        transformer_config=tconf,
    )


def _defaults(kind: str, scheduler_config: dict, extra: dict,
              boundary: float | None) -> tuple[Defaults, dict[str, str]]:
    """The folder's defaults and the source of each: relay.json, then the folder's own configs
    (shift, boundary), then the reference table."""
    table = PRESETS[kind]
    values = dict(table.__dict__)
    sources = {name: f"Wan 2.2 reference ({kind})" for name in values}
    if "flow_shift" in scheduler_config:
        values["shift"] = float(scheduler_config["flow_shift"])
        sources["shift"] = SCHEDULER_CONFIG
    if boundary is not None:
        values["boundary"] = float(boundary)
        sources["boundary"] = "model_index.json"
    house = extra.get("defaults", {})
    unknown = set(house) - set(values)
    if unknown:
        raise ModelError(f"{RELAY_JSON}: unknown default(s) {sorted(unknown)}; known: {', '.join(values)}")
    for name, value in house.items():
        values[name] = value
        sources[name] = RELAY_JSON
    if kind == "ti2v":  # one transformer: no second guidance scale, no expert switch
        values["guidance_low"] = values["boundary"] = None
        sources.pop("guidance_low")
        sources.pop("boundary")
    return Defaults(**values), sources
