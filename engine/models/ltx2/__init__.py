"""The LTX-2 family (Lightricks): one ~19B transformer with a video stream and an audio stream
per block, cross-attention between them, a Gemma 3 text encoder with text connectors, a video
VAE, an audio VAE and a vocoder, as diffusers folders (``LTX2Pipeline`` /
``LTX2ImageToVideoPipeline``). Everything Relay knows about LTX-2 lives in this package and is
reached through :data:`SPEC`:

* :mod:`.config` -- a folder's components, sizes, sound and defaults (with their sources);
* :mod:`.rules` -- the request rules and LTX-2's guidance terms; :mod:`.text` -- Gemma 3 and the
  connectors;
* :mod:`.loading` -- components, the flow-match Euler schedule, meta builds;
* :mod:`.pipeline` -- both streams' noise, the four-forward guidance, the video and audio decode;
* :mod:`.flops` -- FLOPs, tokens and parameters; ``catalog.json`` -- the published model for the
  planner; :mod:`.attention` -- the video-token split for Ulysses / ring; :mod:`.tiny` -- tiny
  random models in the real layout.

Not yet: ``--vae-parallel`` (``parallel`` leaves it out, so it is refused naming the flag),
feature caches and LoRAs (refused by the rules).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from relay.engine.errors import ModelError
from relay.engine.models.ltx2 import config, flops, loading, rules
from relay.engine.models.spec import ModelSpec

_HERE = Path(__file__).resolve().parent


def _lazy(module: str, name: str):
    """``module.name``, imported on first call (the module imports torch)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"relay.engine.models.ltx2.{module}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"Calls :func:`engine.models.ltx2.{module}.{name}`."
    return call


def _no_lora(path):
    """LoRAs are not available for LTX-2 yet (the rules refuse them first)."""
    raise ModelError(f"{path}: LoRAs are not available for LTX-2 yet")


SPEC = ModelSpec(
    name=config.FAMILY,
    description="LTX-2 (video with sound)",
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
    preview_projection=None,
    make_tiny=_lazy("tiny", "make_tiny"),
    lora_weights=_no_lora,
    recipes={},
    taylorseer_modules=(),
    parallel=frozenset({"ulysses", "ring", "cfg_parallel", "fsdp"}),
)
