"""The LTX-2 request rules: sizes, frames, the prompt context, and LTX-2's guidance terms.

LTX-2 guides each step with up to four transformer forwards (``LTX2Pipeline``): the conditional
one; the unconditional one (classifier-free guidance, ``guidance`` for the video stream and the
``audio`` term for the sound); one with self-attention skipped in the ``stg_blocks`` blocks
(spatio-temporal guidance, ``stg`` / ``audio_stg``); one with the audio-video cross-attention off
(modality isolation, ``modality`` / ``audio_modality``). The guided x0 is then pulled back
towards the conditional one's spread (``rescale`` / ``audio_rescale``). Every term defaults to
diffusers' pipeline default; a term at its "off" value (1 for the scales, 0 for STG and the
rescales) skips its forward.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from relay.engine.errors import ValidationError
from relay.engine.request import (
    FPS_RANGE,
    GUIDANCE_RANGE,
    MAX_FRAMES,
    MAX_STEPS,
    RANDOM_SEED,
    REQUEST,
    SEED_MAX,
    SHIFT_RANGE,
    GenerationRequest,
    ResolvedRequest,
    check_float,
    check_int,
    check_side,
    open_image,
)

#: Tokens of the Gemma 3 prompt context (``LTX2Pipeline``'s ``max_sequence_length``).
MAX_SEQUENCE_LENGTH = 1024
#: STG's default block (``spatio_temporal_guidance_blocks=[28]`` of the pipeline).
STG_BLOCK = 28

#: Term -> (default, low, high): the scales are >= 1 ("1" = off) except STG (0 = off); the
#: rescales are in [0, 1] (0 = off).
TERMS: dict[str, tuple[float, float, float]] = {
    "audio": (7.0, *GUIDANCE_RANGE),
    "stg": (1.0, 0.0, 20.0),
    "audio_stg": (1.0, 0.0, 20.0),
    "modality": (3.0, *GUIDANCE_RANGE),
    "audio_modality": (3.0, *GUIDANCE_RANGE),
    "rescale": (0.7, 0.0, 1.0),
    "audio_rescale": (0.7, 0.0, 1.0),
}
BLOCKS = "stg_blocks"


def parse_terms(value) -> dict:
    """``"audio=7,stg=1,stg_blocks=28+29"`` (or a mapping) as ``{term: value}``; blocks are a
    tuple of ints. Names and numbers are checked, not ranges (see :func:`resolve_terms`).

    Raises:
        ValidationError: on field ``guidance_terms``.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            name, eq, number = part.strip().partition("=")
            if not eq or not name.strip():
                raise ValidationError("guidance_terms", f"expected NAME=VALUE pairs separated by commas, got {part!r}")
            items.append((name.strip(), number.strip()))
    else:
        raise ValidationError("guidance_terms", f"must be a string or a mapping, got {type(value).__name__}")
    out = {}
    for name, raw in items:
        if name not in TERMS and name != BLOCKS:
            raise ValidationError("guidance_terms", f"unknown term {name!r}; known: {', '.join([*TERMS, BLOCKS])}")
        if name in out:
            raise ValidationError("guidance_terms", f"{name} is given twice")
        if name == BLOCKS:
            parts = raw.split("+") if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else [raw]
            try:
                out[name] = tuple(int(p) for p in parts)
            except (TypeError, ValueError):
                raise ValidationError("guidance_terms", f"{BLOCKS} must be block numbers joined by '+', "
                                                        f"got {raw!r}") from None
        else:
            try:
                out[name] = float(raw)
            except (TypeError, ValueError):
                raise ValidationError("guidance_terms", f"{name} must be a number, got {raw!r}") from None
    return out


def resolve_terms(value, *, num_layers: int) -> tuple[dict, str]:
    """Every term with its value (given, else the default) and the source of the set.

    Raises:
        ValidationError: on field ``guidance_terms``: unknown term, out of range, or an STG
            block the transformer does not have.
    """
    given = parse_terms(value)
    terms = {}
    for name, (default, low, high) in TERMS.items():
        number = given.get(name, default)
        try:
            terms[name] = check_float(name, number, low, high)
        except ValidationError as exc:
            raise ValidationError("guidance_terms", f"{name}: {exc.message}") from None
    blocks = given.get(BLOCKS)
    if blocks is None:
        # The pipeline's block 28; a smaller model (the tiny ones) perturbs its last block.
        blocks = (STG_BLOCK,) if num_layers > STG_BLOCK else (num_layers - 1,)
    if not blocks or any(b < 0 or b >= num_layers for b in blocks) or len(set(blocks)) != len(blocks):
        raise ValidationError("guidance_terms", f"{BLOCKS} must be distinct blocks in 0..{num_layers - 1}, "
                                                f"got {'+'.join(map(str, blocks))}")
    terms[BLOCKS] = tuple(blocks)
    return terms, REQUEST if given else "LTX-2 reference (diffusers LTX2Pipeline defaults)"


def resolve(request: GenerationRequest, info, *, tokenizer=None) -> ResolvedRequest:
    """Fills defaults and validates every field of ``request`` for the LTX-2 model ``info``.

    Raises:
        ValidationError: naming the first invalid field.
    """
    from relay.engine.models.ltx2.config import dynamic_shift, scheduler_config, video_tokens

    d, default_sources = info.defaults, info.default_sources
    sources: dict[str, str] = {}

    def pick(name: str, given):
        if given is not None:
            sources[name] = REQUEST
            return given
        sources[name] = default_sources.get(name, "default")
        return getattr(d, name)

    prompt = request.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValidationError("prompt", "must be a non-empty string")
    negative = request.negative_prompt if request.negative_prompt is not None else ""
    if not isinstance(negative, str):
        raise ValidationError("negative_prompt", "must be a string")
    for name, why in (("guidance_low", "LTX-2 has a single transformer (no expert switch)"),
                      ("boundary", "LTX-2 has a single transformer (no expert switch)"),
                      ("cache_high", "LTX-2 has a single transformer"), ("cache_low", "LTX-2 has a single transformer"),
                      ("timesteps", "LTX-2 runs its own sigma schedule (steps and shift set it)"),
                      ("preset", "LTX-2 has no presets")):
        if getattr(request, name) is not None:
            raise ValidationError(name, why)
    if request.cache not in (None, "", "none"):
        raise ValidationError("cache", "feature caches are not available for LTX-2 yet (its four guided "
                                       "forwards per step would each need their own cache state)")
    if request.loras:
        raise ValidationError("lora", "LoRAs are not available for LTX-2 yet")
    if request.solver not in (None, "euler"):
        raise ValidationError("solver", f"LTX-2 runs flow-match Euler only, got {request.solver!r}")
    if request.image is not None:
        open_image(request.image)  # decodable, within the limits
    height = check_side("height", pick("height", request.height), info.spatial_multiple)
    width = check_side("width", pick("width", request.width), info.spatial_multiple)
    frames = check_int("frames", pick("frames", request.frames), 1, MAX_FRAMES)
    if (frames - 1) % info.temporal_stride:
        raise ValidationError(
            "frames", f"must be {info.temporal_stride}k+1 (e.g. {frames - (frames - 1) % info.temporal_stride}), got {frames}")
    steps = check_int("steps", pick("steps", request.steps), 1, min(MAX_STEPS, info.num_train_timesteps))
    if request.seed is not None and request.seed != RANDOM_SEED:
        seed, sources["seed"] = request.seed, REQUEST
    else:
        seed, sources["seed"] = secrets.randbelow(SEED_MAX + 1), "random"
    seed = check_int("seed", seed, 0, SEED_MAX)
    guidance = check_float("guidance", pick("guidance", request.guidance), *GUIDANCE_RANGE)
    if request.shift is not None:
        shift, sources["shift"] = request.shift, REQUEST
    else:
        patch_t, patch, _ = info.patch_size
        tokens = video_tokens(height, width, frames, spatial=info.vae_spatial,
                              temporal=info.temporal_stride // patch_t, patch=patch, patch_t=patch_t)
        shift = dynamic_shift(tokens, scheduler_config(info))
        sources["shift"] = f"resolution-dependent ({tokens} video tokens; scheduler/scheduler_config.json)"
    shift = check_float("shift", shift, *SHIFT_RANGE, low_open=True)
    fps = check_int("fps", pick("fps", request.fps), *FPS_RANGE)
    terms, sources["guidance_terms"] = resolve_terms(request.guidance_terms,
                                                     num_layers=int(info.transformer_config.get("num_layers", 48)))
    sources["solver"] = "scheduler/scheduler_config.json"
    sources["caches"] = "default"
    resolved = ResolvedRequest(
        prompt=prompt, negative_prompt=negative, height=height, width=width, frames=frames, steps=steps,
        seed=seed, guidance=guidance, guidance_low=None, shift=shift, boundary=None, fps=fps,
        image=bytes(request.image) if request.image is not None else None, solver="euler",
        guidance_terms=terms, sources=sources,
    )
    if tokenizer is not None:
        check_prompts(tokenizer, resolved)
    return resolved


def check_prompt_tokens(tokenizer, field: str, text: str) -> None:
    """Refuses a prompt longer than the Gemma context instead of truncating it."""
    count = len(tokenizer(text.strip(), add_special_tokens=True).input_ids)
    if count > MAX_SEQUENCE_LENGTH:
        raise ValidationError(field, f"is {count} tokens; the limit is {MAX_SEQUENCE_LENGTH}")


def check_prompts(tokenizer, resolved: ResolvedRequest) -> None:
    """The prompt and negative prompt fit the Gemma 3 context (1024 tokens); never truncated."""
    check_prompt_tokens(tokenizer, "prompt", resolved.prompt)
    check_prompt_tokens(tokenizer, "negative_prompt", resolved.negative_prompt)
