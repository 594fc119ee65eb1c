"""The planner's catalogs: GPUs (``data/gpus.json``) and the published models of every model
family (each family spec's ``catalog``; Wan: ``engine/models/wan/catalog.json``), each entry
with its source, loaded into typed entries and looked up by name or alias. A model is priced at
its family's reference settings (the spec's ``presets`` for its kind)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from relay.engine.errors import ValidationError

DATA_DIR = Path(__file__).with_name("data")


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One GPU of the catalog (``data/gpus.json``); rates dense, links per direction."""

    name: str
    aliases: tuple[str, ...]
    description: str
    architecture: str
    bf16_tflops: float
    tf32_tflops: float
    memory_gb: float
    memory_bandwidth_gbs: float
    nvlink_gbs: float
    nvlink_domain: int
    pcie_gbs: float
    p2p: bool
    inter_node_gbs: float
    gpus_per_node: int
    source: str


@dataclass(frozen=True, kw_only=True)
class VaeSpec:
    """A video VAE: parameters, strides and counted FLOPs per output pixel."""

    name: str
    params: float
    latent_channels: int
    spatial_stride: int
    temporal_stride: int
    decode_flops_per_pixel: float
    encode_flops_per_pixel: float
    source: str
    #: A VAE without published timings takes the efficiencies of this one (named in the source).
    calibration_from: str | None = None


@dataclass(frozen=True, kw_only=True)
class TextEncoderSpec:
    """The text encoder: parameters (and the embedding table's share), dtype, tokens."""

    name: str
    params: float
    embedding_params: float
    dtype_bytes: int
    tokens: int
    source: str


@dataclass(frozen=True, kw_only=True)
class CatalogModel:
    """One published model of a family's catalog.

    Attributes:
        defaults: The family's reference settings for the model's kind
            (:class:`engine.model_info.Defaults`).
    """

    name: str
    aliases: tuple[str, ...]
    family: str
    kind: str
    num_experts: int
    transformer: Mapping[str, object]
    vae: VaeSpec
    text_encoder: TextEncoderSpec
    encodes_video: bool
    defaults: object
    source: str
    #: Transformer forwards per denoise step at the reference settings when guidance alone does
    #: not say (LTX-2: 4, its CFG pair, STG and modality isolation); ``None``: 2 with guidance > 1.
    forwards_per_step: int | None = None

    @property
    def heads(self) -> int:
        """Attention heads (Ulysses must divide them)."""
        return int(self.transformer["num_attention_heads"])

    @property
    def hidden(self) -> int:
        """Model width ``D``."""
        return self.heads * int(self.transformer["attention_head_dim"])

    @property
    def layers(self) -> int:
        """Transformer blocks."""
        return int(self.transformer["num_layers"])

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (VAE stride x patch)."""
        patch = self.transformer.get("patch_size", 1)
        return self.vae.spatial_stride * int(patch[1] if isinstance(patch, (list, tuple)) else patch)

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block (the family's count from the config)."""
        return int(self._parameters()["block"])

    @property
    def expert_params(self) -> int:
        """Parameters of one expert: blocks plus embeddings and the head (the family's count)."""
        return int(self._parameters()["expert"])

    def _parameters(self) -> dict:
        from relay.engine.models import get_spec

        return get_spec(self.family).parameters(dict(self.transformer))


def _lookup(items: Mapping[str, object], name: str, what: str):
    key = name.strip().lower()
    for item in items.values():
        if key == item.name or key in (a.lower() for a in item.aliases):
            return item
    raise ValidationError(what, f"unknown {what} {name!r}; known: {', '.join(items)}")


@cache
def gpus() -> dict[str, GpuSpec]:
    """The GPU catalog by name."""
    raw = json.loads((DATA_DIR / "gpus.json").read_text())["gpus"]
    return {g["name"]: GpuSpec(**{**g, "aliases": tuple(g["aliases"])}) for g in raw}


@cache
def models() -> dict[str, CatalogModel]:
    """Every family's published models by name."""
    from relay.engine.models import specs

    out = {}
    for spec in specs():
        raw = json.loads(spec.catalog.read_text())
        vaes = {n: VaeSpec(name=n, **v) for n, v in raw["vaes"].items()}
        encoders = {n: TextEncoderSpec(name=n, **v) for n, v in raw["text_encoders"].items()}
        for m in raw["models"]:
            out[m["name"]] = CatalogModel(**{
                **m, "aliases": tuple(m["aliases"]), "family": spec.name, "vae": vaes[m["vae"]],
                "text_encoder": encoders[m["text_encoder"]], "defaults": spec.presets[m["kind"]]})
    return out


def find_gpu(name: str) -> GpuSpec:
    """Catalog GPU by name or alias (case-insensitive); :class:`ValidationError` ``gpu`` if unknown."""
    return _lookup(gpus(), name, "gpu")


def find_model(name: str) -> CatalogModel:
    """Catalog model by name or alias; :class:`ValidationError` ``model`` if unknown."""
    return _lookup(models(), name, "model")
