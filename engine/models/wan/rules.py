"""The Wan 2.2 request rules: which fields a kind takes, their multiples, and the defaults.

Unset fields take the folder's defaults (:mod:`engine.models.wan.config`); an unset low-noise
guidance follows the given guidance, as diffusers' ``guidance_scale_2`` follows
``guidance_scale``, so that a call with the same arguments gives the same video as
``WanPipeline``. Each resolved field records its source.
"""

from __future__ import annotations

import math
import secrets

from relay.engine.errors import ValidationError
from relay.engine.request import (
    FPS_RANGE,
    GUIDANCE_RANGE,
    MAX_FRAMES,
    MAX_SIDE,
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
from relay.engine.models.wan.config import RECIPE_SOURCES, RECIPES
from relay.engine.models.wan.text import check_prompt_tokens


def size_from_image(image, area: int, multiple: int) -> tuple[int, int]:
    """Height and width with the aspect of ``image`` and at most ``area`` pixels, on the grid
    (rounded down, as the Wan 2.2 reference I2V sizing does)."""
    aspect = image.height / image.width
    height = max(multiple, round(math.sqrt(area * aspect)) // multiple * multiple)
    width = max(multiple, round(math.sqrt(area / aspect)) // multiple * multiple)
    return min(height, MAX_SIDE - MAX_SIDE % multiple), min(width, MAX_SIDE - MAX_SIDE % multiple)


def resolve(request: GenerationRequest, info, *, tokenizer=None) -> ResolvedRequest:
    """Fills defaults and validates every field of ``request`` for the Wan model ``info``.

    Args:
        request: The request as given.
        info: The target model (:func:`engine.model_info.read_model_info`).
        tokenizer: When given, prompts are also checked against the 512-token limit.

    Raises:
        ValidationError: naming the first invalid field.
    """
    from relay.engine.caches import resolve_caches
    from relay.engine.lora import resolve_loras
    from relay.engine.solvers import SOLVERS, check_timesteps, solver_of

    d, default_sources = info.defaults, info.default_sources
    sources: dict[str, str] = {}
    recipe = {}
    if request.preset is not None:
        if request.preset not in RECIPES:
            raise ValidationError("preset", f"unknown preset {request.preset!r}; known: {', '.join(RECIPES)}")
        recipe = RECIPES[request.preset]

    def pick(name: str, given):
        if given is not None:
            sources[name] = REQUEST
            return given
        if name in recipe and not (name == "guidance_low" and not info.is_moe):
            sources[name] = RECIPE_SOURCES[request.preset]
            return recipe[name]
        sources[name] = default_sources.get(name, "default")
        return getattr(d, name)

    if request.guidance_terms:
        raise ValidationError("guidance_terms", "Wan models have no guidance terms beyond guidance and "
                                                "guidance_low")
    prompt = request.prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValidationError("prompt", "must be a non-empty string")
    negative = request.negative_prompt if request.negative_prompt is not None else ""
    if not isinstance(negative, str):
        raise ValidationError("negative_prompt", "must be a string")
    image = None
    if request.image is not None:
        if info.kind == "t2v":
            raise ValidationError("image", "this is a text-to-video model; it takes no image")
        image = open_image(request.image)
    elif info.kind == "i2v":
        raise ValidationError("image", "this image-to-video model needs an input image")
    if info.image_dim is not None:
        raise ValidationError("image", "models with a CLIP image encoder (Wan 2.1 I2V) are not supported")
    height, width = request.height, request.width
    if image is not None and info.kind == "i2v" and height is None and width is None:
        height, width = size_from_image(image, d.height * d.width, info.spatial_multiple)
        sources["height"] = sources["width"] = "image aspect, reference area"
    height = check_side("height", pick("height", height), info.spatial_multiple)
    width = check_side("width", pick("width", width), info.spatial_multiple)
    frames = check_int("frames", pick("frames", request.frames), 1, MAX_FRAMES)
    if (frames - 1) % info.temporal_stride:
        raise ValidationError(
            "frames", f"must be {info.temporal_stride}k+1 (e.g. {frames - (frames - 1) % info.temporal_stride}), got {frames}")
    folder_solver = solver_of(info.scheduler_class) or info.scheduler_class
    solver = request.solver
    if solver is not None:
        if solver not in SOLVERS:
            raise ValidationError("solver", f"must be one of {', '.join(SOLVERS)}, got {solver!r}")
        sources["solver"] = REQUEST
    elif "solver" in recipe:
        solver, sources["solver"] = recipe["solver"], RECIPE_SOURCES[request.preset]
    else:
        solver, sources["solver"] = folder_solver, "scheduler/scheduler_config.json"
    timesteps = request.timesteps
    if timesteps is None and "timesteps" in recipe and request.steps is None:
        timesteps, sources["timesteps"] = recipe["timesteps"], RECIPE_SOURCES[request.preset]
    elif timesteps is not None:
        sources["timesteps"] = REQUEST
    if timesteps is not None:
        timesteps = check_timesteps(timesteps, steps=request.steps,
                                    solver=solver, num_train_timesteps=info.num_train_timesteps)
        steps, sources["steps"] = len(timesteps), sources["timesteps"]
    else:
        steps = pick("steps", request.steps)
    steps = check_int("steps", steps, 1, min(MAX_STEPS, info.num_train_timesteps))
    if request.seed is not None and request.seed != RANDOM_SEED:
        seed, sources["seed"] = request.seed, REQUEST
    else:
        seed, sources["seed"] = secrets.randbelow(SEED_MAX + 1), "random"
    seed = check_int("seed", seed, 0, SEED_MAX)
    guidance = check_float("guidance", pick("guidance", request.guidance), *GUIDANCE_RANGE)
    if info.is_moe:
        if request.guidance_low is None and request.guidance is not None:
            low, sources["guidance_low"] = guidance, "guidance (as diffusers' guidance_scale_2)"
        else:
            low = pick("guidance_low", request.guidance_low)
        guidance_low = check_float("guidance_low", guidance if low is None else low, *GUIDANCE_RANGE)
        boundary = check_float("boundary", pick("boundary", request.boundary), 0.0, 1.0, low_open=True)
        if boundary >= 1.0:
            raise ValidationError("boundary", f"must be below 1.0, got {boundary}")
    else:
        for name in ("guidance_low", "boundary"):
            if getattr(request, name) is not None:
                raise ValidationError(name, "this model has a single transformer (no expert switch)")
        guidance_low, boundary = None, None
    shift = check_float("shift", pick("shift", request.shift), *SHIFT_RANGE, low_open=True)
    fps = check_int("fps", pick("fps", request.fps), *FPS_RANGE)
    experts = ("high_noise", "low_noise") if info.is_moe else ("dense",)
    if isinstance(request.loras, (str, bytes)) or not isinstance(request.loras, (list, tuple)):
        raise ValidationError("lora", f"must be a list of LoRAs, got {type(request.loras).__name__}")
    loras = resolve_loras(request.loras, info, experts=experts)
    caches = resolve_caches(request.cache, request.cache_high, request.cache_low, experts=experts)
    sources["caches"] = REQUEST if any(v is not None for v in (request.cache, request.cache_high,
                                                                request.cache_low)) else "default"
    resolved = ResolvedRequest(
        prompt=prompt, negative_prompt=negative, height=height, width=width, frames=frames,
        steps=steps, seed=seed, guidance=guidance, guidance_low=guidance_low, shift=shift,
        boundary=boundary, fps=fps, image=bytes(request.image) if request.image is not None else None,
        solver=solver, timesteps=timesteps, loras=loras, caches=caches, sources=sources,
    )
    if tokenizer is not None:
        check_prompts(tokenizer, resolved)
    return resolved


def check_prompts(tokenizer, resolved: ResolvedRequest) -> None:
    """The prompt and negative prompt fit the UMT5 context (512 tokens); never truncated."""
    check_prompt_tokens(tokenizer, "prompt", resolved.prompt)
    check_prompt_tokens(tokenizer, "negative_prompt", resolved.negative_prompt)
