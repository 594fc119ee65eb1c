"""What a model directory is, read from its JSON configs alone (no weights are opened).

Validation, the CLI, and later the server need a model's kind, its size multiples and its
default settings before any weights are loaded; this module answers those from
``model_index.json`` and the component configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from relay.engine.errors import ModelError

#: Tokens of the UMT5 text encoder context used by every Wan 2.x model.
MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """Generation settings used where a request leaves a field unset."""

    height: int
    width: int
    frames: int
    steps: int
    shift: float
    guidance: float
    guidance_low: float | None
    fps: int


#: Reference settings of the Wan 2.2 release for each model kind (official repo's configs).
PRESETS: dict[str, Defaults] = {
    "t2v": Defaults(height=720, width=1280, frames=81, steps=40, shift=12.0, guidance=4.0,
                    guidance_low=3.0, fps=16),
    "i2v": Defaults(height=720, width=1280, frames=81, steps=40, shift=5.0, guidance=3.5,
                    guidance_low=3.5, fps=16),
    "ti2v": Defaults(height=704, width=1280, frames=121, steps=50, shift=5.0, guidance=5.0,
                     guidance_low=None, fps=24),
}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Static facts about a Wan 2.x diffusers model directory.

    Attributes:
        path: The model directory.
        kind: ``t2v`` (text-to-video MoE), ``i2v`` (image-to-video MoE) or ``ti2v`` (dense,
            text and optional image, per-token timesteps).
        experts: Transformer sub-folders, high-noise first (``transformer``, ``transformer_2``).
        boundary_ratio: Fraction of ``num_train_timesteps`` at which the low-noise expert takes
            over; ``None`` for a dense model.
        expand_timesteps: Whether the transformer takes one timestep per latent token (TI2V-5B).
        spatial_multiple: Height and width must be multiples of this (VAE stride x patch).
        temporal_stride: Frames must be ``temporal_stride * k + 1``.
        defaults: Settings used for unset request fields (kind preset, then ``relay.json``).
    """

    path: Path
    kind: str
    experts: tuple[str, ...]
    boundary_ratio: float | None
    expand_timesteps: bool
    spatial_multiple: int
    vae_spatial: int
    temporal_stride: int
    patch_size: tuple[int, int, int]
    z_dim: int
    in_channels: int
    num_attention_heads: int
    num_train_timesteps: int
    scheduler_class: str
    image_dim: int | None
    tiny: bool
    defaults: Defaults
    transformer_config: dict = field(repr=False)

    @property
    def is_moe(self) -> bool:
        """True when the model has a high-noise and a low-noise expert."""
        return len(self.experts) == 2


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: not a diffusers Wan model directory") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from None


def resolve_model_path(model: str | os.PathLike) -> Path:
    """Finds a model directory: a local path, or a hub id already in the local HF cache.

    A hub id (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``) is looked up only in the cache that
    ``HF_HOME`` / ``HF_HUB_CACHE`` point to; nothing is downloaded.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if text.count("/") == 1 and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any cache miss is reported the same way
            raise ModelError(
                f"model {text!r} is not a directory and is not in the local Hugging Face cache "
                f"(HF_HOME); download it first, Relay never downloads weights ({type(exc).__name__})"
            ) from None
    raise ModelError(f"model directory {text!r} does not exist")


def read_model_info(model: str | os.PathLike) -> ModelInfo:
    """Reads a model directory's configs and classifies it; opens no weights.

    Raises:
        ModelError: The directory is missing, incomplete, or not a Wan 2.x layout.
    """
    path = resolve_model_path(model)
    index = _read_json(path / "model_index.json")
    experts = tuple(name for name in ("transformer", "transformer_2") if _component(index, name))
    if not experts:
        raise ModelError(f"{path}/model_index.json names no transformer")
    tconf = _read_json(path / experts[0] / "config.json")
    vconf = _read_json(path / "vae" / "config.json")
    sconf = _read_json(path / "scheduler" / "scheduler_config.json")
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
    extra = _read_relay_json(path)
    preset = PRESETS[kind].__dict__ | extra.get("defaults", {})
    if kind == "ti2v":
        preset["guidance_low"] = None
    return ModelInfo(
        path=path, kind=kind, experts=experts,
        boundary_ratio=float(boundary) if boundary is not None else None,
        expand_timesteps=expand, spatial_multiple=vae_spatial * patch[1], vae_spatial=vae_spatial,
        temporal_stride=int(vconf.get("scale_factor_temporal") or 4), patch_size=patch,
        z_dim=z_dim, in_channels=in_channels,
        num_attention_heads=int(tconf.get("num_attention_heads", 40)),
        num_train_timesteps=int(sconf.get("num_train_timesteps", 1000)),
        scheduler_class=str(sconf.get("_class_name", "UniPCMultistepScheduler")),
        image_dim=tconf.get("image_dim"), tiny=bool(extra.get("tiny", False)),
        defaults=Defaults(**{k: preset[k] for k in Defaults.__dataclass_fields__}),
        transformer_config=tconf,
    )


def _component(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and value[0] is not None


def _read_relay_json(path: Path) -> dict:
    """Optional per-model house settings (``relay.json``): ``{"defaults": {...}}``."""
    file = path / "relay.json"
    return _read_json(file) if file.exists() else {}
