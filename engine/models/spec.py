"""``ModelSpec``: everything Relay knows about one model family, in one object.

A family (Wan 2.2 today, LTX-2 next) is one :class:`ModelSpec` registered under its name. The
generic engine asks the spec, never the family's modules directly:

* **folder**: which ``model_index.json`` pipeline classes it reads, how a folder becomes a
  :class:`~engine.model_info.ModelInfo` (kind, experts, defaults and where each came from);
* **requests**: the family's rules that turn a :class:`~engine.request.GenerationRequest` into
  a validated :class:`~engine.request.ResolvedRequest`;
* **schedule**: the scheduler built from the folder's own config and the expert of every step;
* **loading**: the components on a device, and the transformer / text encoder built on the meta
  device for FSDP2 (:class:`MetaModel`);
* **running**: the family's pipeline (conditioning, noise, per-step model inputs, decode);
* **parallelism**: where a transformer's tokens are split and gathered (diffusers' ``_cp_plan``)
  and which attention modules take Relay's attention kernel -- the sequence-parallel one, or, in a
  group that does not split the sequence, the kernel chosen for the GPU (:class:`SequenceParallelPlan`);
* **costs and previews**: FLOPs of a forward, tokens of a video, the planner's catalog entries,
  the published latent-to-RGB projection;
* **adapters**: LoRA files in the layouts the family's users have, as module deltas;
* **tests and demos**: a tiny random model written in the real folder layout.

Every callable imports what it needs when called, so importing a spec costs nothing (``relay
--help`` must not import torch). Adding a family = one new package with one spec, plus one line
in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Registered families: name -> module whose ``SPEC`` is the family's :class:`ModelSpec`.
FAMILIES: dict[str, str] = {
    "wan2.2": "relay.engine.models.wan",
    "ltx2": "relay.engine.models.ltx2",
}


@dataclass(frozen=True, kw_only=True)
class MetaModel:
    """A module built on the meta device, with what FSDP2 sharding and loading need to know.

    Attributes:
        module: The model on ``meta`` (no storage).
        blocks: The repeated blocks, each sharded as its own FSDP group before the root.
        keep_fp32: Dotted-name components whose parameters stay fp32 whatever the dtype (as the
            library's own ``from_pretrained`` keeps them).
        weights_stem: Checkpoint file stem in the folder (``diffusion_pytorch_model``, ``model``).
        rebuild_buffers: Class name -> function building a fresh CPU copy of such a module, for
            non-persistent buffers that checkpoints do not store (e.g. rotary tables).
    """

    module: object
    blocks: tuple
    keep_fp32: frozenset[str]
    weights_stem: str
    rebuild_buffers: Mapping[str, Callable] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SequenceParallelPlan:
    """Where a transformer's token sequence is split over the sequence-parallel ranks.

    Attributes:
        cp_plan: ``{module path: {input name or output index: ContextParallelInput} |
            ContextParallelOutput}`` -- diffusers' own ``_cp_plan`` declaration of the model
            class (``""`` is the model itself).
        self_attention: ``model -> attention modules`` whose attention spans the whole sequence
            (a rank that does not split it runs them on Relay's kernel too, on CUDA or where a
            kernel is named: :class:`parallel.sequence.LocalAttention`).
        processor: ``kernel -> attention processor`` computing that attention locally per token
            (projections, norms, rotary) and calling ``kernel(query, key, value)`` (each
            ``(batch, local tokens, heads, head_dim)``) for the part that spans the group.
        gathered_keys: ``model -> attention modules`` whose queries are another, whole stream
            and whose keys and values are the split tokens (LTX-2's video-to-audio attention:
            the audio attends to every video token); ``None``: there are none.
        gather_processor: ``gather -> attention processor`` for those modules: it computes the
            keys and values of this rank's tokens and calls ``gather(key, value)`` (each
            ``(batch, local tokens, ...)``), which returns them over the whole sequence.
    """

    cp_plan: Mapping
    self_attention: Callable
    processor: Callable
    gathered_keys: Callable | None = None
    gather_processor: Callable | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model family (see the module docstring). Every field is required but ``parallel``.

    Attributes:
        name: Registry name (``wan2.2``).
        description: One line for ``relay --help`` and logs.
        kinds: Model kinds of the family (``t2v``, ``i2v``, ``ti2v``).
        pipeline_classes: ``model_index.json`` ``_class_name`` values a folder of the family has.
        presets: Kind -> the family's reference settings (what a folder cannot say).
        read_info: ``(path, model_index) -> ModelInfo``.
        resolve: ``(request, info, *, tokenizer) -> ResolvedRequest`` (the request rules; with a
            tokenizer, prompt lengths too).
        check_prompts: ``(tokenizer, resolved) -> None``: the prompt-length rule alone.
        build_scheduler: ``(info, shift, solver=None) -> scheduler`` from the folder's own
            scheduler config (``solver``: a name of :data:`engine.solvers.SOLVERS`).
        expert_schedule: ``(info, steps, shift, boundary, *, solver=None, timesteps=None) ->
            [expert per step]`` (``timesteps``: an explicit schedule); ``info`` may be
            ``None`` (the planner prices catalog models without a folder: the family's reference
            scheduler config is used).
        load: ``(info, *, dtype, device, experts, text_encoder, vae, tokenizer, offload) ->
            LoadedModel``.
        load_tokenizer: ``info -> tokenizer`` (cheap: prompt lengths are checked before loading).
        load_text_encoder: ``(info, *, dtype, device) -> module``.
        meta_transformer: ``(info, expert) -> (MetaModel, weights folder)`` of one expert, for FSDP2.
        meta_text_encoder: ``(info, *, dtype) -> (MetaModel, weights folder)`` of the text
            encoder, for FSDP2.
        pipeline: ``LoadedModel -> pipeline`` with ``prepare(resolved)``, ``step_inputs(cond,
            latents)`` and ``decode(latents, cond)`` (see :mod:`engine.pipeline`).
        sequence_parallel: The family's :class:`SequenceParallelPlan`.
        flops: ``(transformer config, tokens, text_tokens) -> {"total", "self_attention", ...}``.
        video_tokens: ``(transformer config, *, height, width, frames, vae_spatial,
            vae_temporal) -> tokens``.
        parameters: ``transformer config -> {"block": n, "expert": n}``: parameters of one
            block and of one expert (the planner's memory and FSDP traffic).
        catalog: JSON file of the family's published models for the planner.
        preview_projection: JSON file of a published latent-to-RGB projection, or ``None``.
        make_tiny: ``(directory, *, kind, seed) -> Path``: a tiny random model in the real layout.
        lora_weights: ``path -> engine.lora.LoraWeights``: a LoRA file of the family in any
            layout it reads, as module deltas in the loaded model's naming.
        recipes: Named request recipes (``preset``): ``{name: {field: value}}``.
        taylorseer_modules: Module-name patterns (``re.fullmatch``) whose outputs TaylorSeer
            predicts on its cached steps (diffusers' default patterns miss some families).
        parallel: The group layouts the family runs, as their flags (``ulysses``, ``ring``,
            ``cfg_parallel``, ``fsdp``, ``vae_parallel``); others are refused naming the flag.
    """

    name: str
    description: str
    kinds: tuple[str, ...]
    pipeline_classes: tuple[str, ...]
    presets: Mapping
    read_info: Callable
    resolve: Callable
    check_prompts: Callable
    build_scheduler: Callable
    expert_schedule: Callable
    load: Callable
    load_tokenizer: Callable
    load_text_encoder: Callable
    meta_transformer: Callable
    meta_text_encoder: Callable
    pipeline: Callable
    sequence_parallel: Callable
    flops: Callable
    video_tokens: Callable
    parameters: Callable
    catalog: Path
    preview_projection: Path | None
    make_tiny: Callable
    lora_weights: Callable
    recipes: Mapping
    taylorseer_modules: tuple[str, ...]
    parallel: frozenset[str] = frozenset({"ulysses", "ring", "cfg_parallel", "fsdp", "vae_parallel"})


def get_spec(name: str) -> ModelSpec:
    """The spec of family ``name``.

    Raises:
        KeyError: no such family (the message lists the known ones).
    """
    module = FAMILIES.get(name)
    if module is None:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(module).SPEC


def specs() -> list[ModelSpec]:
    """Every registered family's spec, in registry order."""
    return [get_spec(name) for name in FAMILIES]


def spec_for_index(index: Mapping) -> ModelSpec | None:
    """The family whose pipeline classes include ``model_index.json``'s ``_class_name``."""
    name = index.get("_class_name")
    for spec in specs():
        if name in spec.pipeline_classes:
            return spec
    return None
