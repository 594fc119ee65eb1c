"""Loading an LTX-2 diffusers folder through the real diffusers / transformers loaders, its
flow-match Euler scheduler from the folder's own config, and the meta-device builds FSDP2 shards.

The transformer is the family's one expert (``dense``). Besides the tokenizer, the Gemma 3 text
encoder and the video VAE that every family has, LTX-2 loads three components of its own into
:attr:`engine.loader.LoadedModel.components`: the text ``connectors`` (Gemma's stacked hidden
states to the video and audio streams' text tokens), the ``audio_vae`` and the ``vocoder``.
"""

from __future__ import annotations

import os
from pathlib import Path

from relay.engine.errors import ModelError
from relay.engine.experts import DENSE

#: LTX-2's released scheduler config, for the planner's catalog models (no folder to read).
REFERENCE_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                       "use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05,
                       "base_image_seq_len": 1024, "max_image_seq_len": 4096, "shift_terminal": 0.1,
                       "time_shift_type": "exponential"}


def _index(info) -> dict:
    import json

    return json.loads((info.path / "model_index.json").read_text())


def _class(info, component: str):
    """The class ``model_index.json`` names for ``component`` (diffusers, transformers or the
    LTX-2 pipeline package's own)."""
    import importlib

    library, name = _index(info)[component]
    module = {"ltx2": "diffusers.pipelines.ltx2"}.get(library, library)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ModelError(f"{info.path}: {component} class {library}.{name} is not available in this "
                         "diffusers / transformers") from None


def load_tokenizer(info):
    """The Gemma tokenizer (cheap: used to check prompt lengths before any weights load)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(info.path / "tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot load the tokenizer: {exc}") from exc


def load_text_encoder(info, *, dtype, device):
    """The Gemma 3 text encoder on ``device`` (eval mode, no gradients), straight to the device."""
    cls = _class(info, "text_encoder")
    try:
        encoder = cls.from_pretrained(info.path / "text_encoder", dtype=dtype, device_map={"": str(device)})
    except (OSError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot load the text encoder: {exc}") from exc
    return encoder.eval().requires_grad_(False)


def load(info, *, dtype, device, experts=None, text_encoder: bool = True, vae: bool = True,
         tokenizer=None, offload: bool = False):
    """Loads the components of an LTX-2 folder offline (see :func:`engine.loader.load_model`).

    The video VAE, the audio VAE and the vocoder run in fp32 whatever ``dtype`` (the decode is
    a small share of a generation and keeps its precision); the connectors take ``dtype``, as
    in ``LTX2Pipeline.from_pretrained(torch_dtype=...)``.
    """
    import torch
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel

    from relay.engine.loader import LoadedModel

    path: Path = info.path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wanted = experts if experts is not None else (DENSE,)
    unknown = set(wanted) - {DENSE}
    if unknown:
        raise ModelError(f"{path}: no expert named {sorted(unknown)}; LTX-2 has one transformer ({DENSE})")
    home = torch.device("cpu") if offload else device
    try:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info)
        encoder = load_text_encoder(info, dtype=dtype, device=home) if text_encoder else None
        components = {}
        if text_encoder:
            components["connectors"] = _class(info, "connectors").from_pretrained(
                path, subfolder="connectors", dtype=dtype).to(device).eval().requires_grad_(False)
        decoder = None
        if vae:
            decoder = AutoencoderKLLTX2Video.from_pretrained(path, subfolder="vae", dtype=torch.float32)
            decoder = decoder.to(device).eval().requires_grad_(False)
            components["audio_vae"] = AutoencoderKLLTX2Audio.from_pretrained(
                path, subfolder="audio_vae", dtype=torch.float32).to(device).eval().requires_grad_(False)
            components["vocoder"] = _class(info, "vocoder").from_pretrained(
                path, subfolder="vocoder", dtype=torch.float32).to(device).eval().requires_grad_(False)
        loaded = {}
        if DENSE in wanted:
            module = LTX2VideoTransformer3DModel.from_pretrained(path, subfolder="transformer", dtype=dtype,
                                                                 device_map={"": str(home)})
            loaded[DENSE] = module.eval().requires_grad_(False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load model components: {exc}") from exc
    return LoadedModel(info=info, device=device, dtype=dtype, tokenizer=tokenizer, text_encoder=encoder,
                       vae=decoder, experts=loaded, offload=offload, components=components)


def build_scheduler(info, shift: float, solver: str | None = None):
    """The folder's flow-match Euler scheduler. ``shift`` is applied when the schedule is set
    (:func:`set_schedule`: LTX-2's shift depends on the request's size, as ``mu``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if solver not in (None, "euler"):
        raise ModelError(f"LTX-2 runs flow-match Euler only, not {solver!r}")
    config = dict(REFERENCE_SCHEDULER) if info is None else FlowMatchEulerDiscreteScheduler.load_config(
        info.path / "scheduler")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def set_schedule(scheduler, steps: int, shift: float, *, device=None) -> None:
    """LTX-2's sigmas: ``linspace(1, 1/steps, steps)`` under the flow shift ``exp(mu) = shift``
    (the pipeline's ``retrieve_timesteps(..., sigmas=..., mu=...)``), starting at step 0."""
    import math

    import numpy as np

    sigmas = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=math.log(shift))
    scheduler.set_begin_index(0)


def expert_schedule(info, steps: int, shift: float, boundary: float | None, *, solver: str | None = None,
                    timesteps=None) -> list[str]:
    """Every step runs the one transformer."""
    return [DENSE] * (len(timesteps) if timesteps else steps)


def transformer_on_meta(folder: Path):
    """An ``LTX2VideoTransformer3DModel`` from ``folder``'s config, built on the meta device."""
    import torch
    from diffusers import LTX2VideoTransformer3DModel

    from relay.engine.models.spec import MetaModel

    config = LTX2VideoTransformer3DModel.load_config(folder)
    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel.from_config(config)
    keep = frozenset(getattr(model, "_keep_in_fp32_modules", None) or [])
    return MetaModel(module=model, blocks=tuple(model.transformer_blocks), keep_fp32=keep,
                     weights_stem="diffusion_pytorch_model")


def meta_transformer(info, expert: str):
    """The transformer on the meta device, with its folder (``(MetaModel, folder)``)."""
    if expert != DENSE:
        raise ModelError(f"LTX-2 has one transformer ({DENSE}), not {expert!r}")
    folder = info.path / "transformer"
    return transformer_on_meta(folder), folder


def meta_text_encoder(info, *, dtype):
    """The Gemma 3 text encoder on the meta device, with its folder (``(MetaModel, folder)``)."""
    import torch

    from relay.engine.models.spec import MetaModel

    cls = _class(info, "text_encoder")
    folder = info.path / "text_encoder"
    config = cls.config_class.from_pretrained(folder)
    with torch.device("meta"):
        model = cls(config)
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    layers = model.model.language_model.layers
    return MetaModel(module=model, blocks=tuple(layers), keep_fp32=frozenset(keep), weights_stem="model"), folder
