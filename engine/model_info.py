"""What a model directory is, read from its JSON configs alone (no weights are opened).

Validation, the CLI and the server need a model's family, kind, size multiples and default
settings before any weights are loaded. :func:`read_model_info` finds the folder's family from
``model_index.json`` (:func:`engine.models.spec_for_index`) and lets the family's spec read the
rest (for Wan: :mod:`engine.models.wan.config`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from relay.engine.errors import ModelError


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """Generation settings used where a request leaves a field unset (``boundary`` and
    ``guidance_low`` are ``None`` for a dense model)."""

    height: int
    width: int
    frames: int
    steps: int
    shift: float
    boundary: float | None
    guidance: float
    guidance_low: float | None
    fps: int


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Static facts about a model directory.

    Attributes:
        path: The model directory.
        family: Its family's registry name (``wan2.2``; see :mod:`engine.models`).
        kind: ``t2v`` (text-to-video MoE), ``i2v`` (image-to-video MoE) or ``ti2v`` (dense,
            text and optional image, per-token timesteps).
        experts: Transformer sub-folders, high-noise first (``transformer``, ``transformer_2``).
        boundary_ratio: Fraction of ``num_train_timesteps`` at which the low-noise expert takes
            over, from ``model_index.json``; ``None`` for a dense model.
        expand_timesteps: Whether the transformer takes one timestep per latent token (TI2V-5B).
        spatial_multiple: Height and width must be multiples of this (VAE stride x patch).
        temporal_stride: Frames must be ``temporal_stride * k + 1``.
        defaults: Settings used for unset request fields.
        default_sources: Where each default came from (``relay.json``,
            ``scheduler/scheduler_config.json``, ``model_index.json``, ``Wan 2.2 reference (t2v)``).
        has_audio: The model generates a sound track with the video (LTX-2).
        audio_sample_rate: Samples per second of that track (the vocoder's output rate).
    """

    path: Path
    family: str
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
    default_sources: Mapping[str, str] = field(default_factory=dict)
    transformer_config: dict = field(repr=False, default_factory=dict)
    has_audio: bool = False
    audio_sample_rate: int | None = None

    @property
    def is_moe(self) -> bool:
        """True when the model has a high-noise and a low-noise expert."""
        return len(self.experts) == 2

    @property
    def tasks(self) -> tuple[str, ...]:
        """What the model takes: ``("t2v",)`` text, ``("i2v",)`` text and a first image, or
        both (Wan TI2V-5B, LTX-2)."""
        return {"t2v": ("t2v",), "i2v": ("i2v",)}.get(self.kind, ("t2v", "i2v"))

    @property
    def spec(self):
        """The family's :class:`~engine.models.spec.ModelSpec`."""
        from relay.engine.models import get_spec

        return get_spec(self.family)


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
        ModelError: The directory is missing, incomplete, or of no known family.
    """
    from relay.engine.models import FAMILIES, spec_for_index

    path = resolve_model_path(model)
    index_file = path / "model_index.json"
    try:
        index = json.loads(index_file.read_text())
    except FileNotFoundError:
        raise ModelError(f"{index_file} is missing: not a diffusers model directory") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_file} is not valid JSON: {exc}") from None
    spec = spec_for_index(index)
    if spec is None:
        raise ModelError(f"{path}: pipeline {index.get('_class_name')!r} is of no supported family "
                         f"({', '.join(FAMILIES)})")
    return spec.read_info(path, index)
