"""The Wan 2.2 family: T2V-A14B and I2V-A14B (two 14B experts split at a boundary timestep)
and the dense TI2V-5B, as diffusers folders (``WanPipeline`` / ``WanImageToVideoPipeline``).

Everything Relay knows about Wan lives in this package and is reached through :data:`SPEC`:

* :mod:`.config` -- a folder's kind, experts and defaults (with their sources), the reference table;
* :mod:`.rules` -- the request rules; :mod:`.text` -- prompt cleaning, length, UMT5 encoding;
* :mod:`.loading` -- components, the folder's scheduler, the expert schedule, meta builds for FSDP2;
* :mod:`.pipeline` -- conditioning, per-step inputs, decode; :mod:`.attention` -- the
  self-attention processor and split points for sequence parallelism;
* :mod:`.flops` -- FLOPs and tokens; ``catalog.json`` -- the published models for the planner;
  ``wan21_latent_rgb.json`` -- the published preview projection; :mod:`.tiny` -- tiny models;
* :mod:`.lora` -- LoRA files in the diffusers, original Wan / ComfyUI and kohya layouts.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from relay.engine.models.spec import ModelSpec
from relay.engine.models.wan import config, flops, loading, rules

_HERE = Path(__file__).resolve().parent


def _lazy(module: str, name: str):
    """``module.name``, imported on first call (the module imports torch)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"relay.engine.models.wan.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Calls :func:`engine.models.wan.{module}.{name}`."
    return call


SPEC = ModelSpec(
    name=config.FAMILY,
    description="Wan 2.2: T2V-A14B / I2V-A14B (two experts) and TI2V-5B (dense)",
    kinds=config.KINDS,
    pipeline_classes=config.PIPELINE_CLASSES,
    presets=config.PRESETS,
    read_info=config.read_info,
    resolve=rules.resolve,
    check_prompts=rules.check_prompts,
    build_scheduler=loading.build_scheduler,
    expert_schedule=loading.expert_schedule,
    load=loading.load,
    load_tokenizer=loading.load_tokenizer,
    load_text_encoder=loading.load_text_encoder,
    meta_transformer=loading.meta_transformer,
    meta_text_encoder=loading.meta_text_encoder,
    pipeline=_lazy("pipeline", "Pipeline"),
    sequence_parallel=_lazy("attention", "sequence_parallel_plan"),
    flops=flops.transformer_flops,
    video_tokens=flops.video_tokens,
    parameters=flops.parameter_counts,
    catalog=_HERE / "catalog.json",
    preview_projection=_HERE / "wan21_latent_rgb.json",
    make_tiny=_lazy("tiny", "make_tiny"),
    lora_weights=_lazy("lora", "lora_weights"),
    recipes=config.RECIPES,
    # Each block's self-attention, cross-attention and feed-forward outputs (diffusers'
    # default "^blocks.*attn" does not fullmatch Wan's "blocks.N.attn1").
    taylorseer_modules=(r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn"),
)
