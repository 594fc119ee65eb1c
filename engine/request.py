"""Generation requests: what a user asks for, and the fully resolved, validated form.

Every front end (CLI, gRPC, Python) builds a :class:`GenerationRequest` and calls
:func:`resolve_request`, which fills unset fields from the model's defaults and checks every
field before any weights are used. Errors name the field (:class:`engine.errors.ValidationError`).
Nothing is rounded or clamped silently: a value that the model cannot take is refused.
"""

from __future__ import annotations

import io
import math
import secrets
from dataclasses import asdict, dataclass

from relay.engine.errors import ValidationError
from relay.engine.model_info import MAX_SEQUENCE_LENGTH, ModelInfo

MAX_SIDE = 2048
MAX_FRAMES = 257
MAX_STEPS = 1000
GUIDANCE_RANGE = (1.0, 20.0)
SHIFT_RANGE = (0.0, 100.0)  # exclusive low end
FPS_RANGE = (1, 120)
SEED_MAX = 2**63 - 1
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 16


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """A generation as asked for; ``None`` means "use the model's default".

    Attributes:
        prompt: What the video shows. Required, at most 512 text-encoder tokens.
        negative_prompt: What to steer away from (used with guidance > 1).
        height, width: Output size in pixels; multiples of the model's spatial multiple.
        frames: Number of frames, ``4k + 1``.
        steps: Denoising steps, 1..1000.
        seed: 0..2**63-1; ``None`` picks one at random (reported in the resolved request).
        guidance: Classifier-free guidance for the high-noise expert (or the only one);
            1.0 turns guidance off.
        guidance_low: Guidance for the low-noise expert (MoE models only).
        shift: Flow-matching sigma shift of the scheduler.
        boundary: Boundary ratio overriding the model's (MoE models only).
        fps: Frames per second of the written video.
        image: Encoded image bytes (PNG, JPEG, WebP) for image-to-video.
    """

    prompt: str
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    seed: int | None = None
    guidance: float | None = None
    guidance_low: float | None = None
    shift: float | None = None
    boundary: float | None = None
    fps: int | None = None
    image: bytes | None = None


@dataclass(frozen=True, kw_only=True)
class ResolvedRequest:
    """A validated request with every field concrete. ``image`` stays as the encoded bytes."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    frames: int
    steps: int
    seed: int
    guidance: float
    guidance_low: float | None
    shift: float
    boundary: float | None
    fps: int
    image: bytes | None

    def to_dict(self, *, with_image: bool = False) -> dict:
        """Plain dict of the settings (the image is dropped unless asked for)."""
        data = asdict(self)
        if not with_image:
            data["image"] = None
        return data


def _check_int(field: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(field, f"must be between {low} and {high}, got {value}")
    return value


def _check_float(field: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValidationError(field, f"must be finite, got {value}")
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ValidationError(field, f"must be in {bracket}{low}, {high}], got {value}")
    return value


def _check_side(field: str, value: int, multiple: int) -> int:
    _check_int(field, value, multiple, MAX_SIDE)
    if value % multiple:
        raise ValidationError(field, f"must be a multiple of {multiple} for this model, got {value}")
    return value


def open_image(data: bytes):
    """Decodes image bytes safely: size, pixel-count (decompression bomb) and format checks.

    Returns:
        An RGB ``PIL.Image``.

    Raises:
        ValidationError: on field ``image``.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValidationError("image", "is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValidationError("image", f"is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size  # header only: nothing decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise ValidationError(
                    "image", f"is {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
            if min(width, height) < MIN_IMAGE_SIDE:
                raise ValidationError("image", f"is {width}x{height}; each side must be >= {MIN_IMAGE_SIDE}")
            probe.load()
            return probe.convert("RGB")
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValidationError("image", f"cannot be decoded as an image ({type(exc).__name__})") from None


def _size_from_image(image, area: int, multiple: int) -> tuple[int, int]:
    """Height and width with the aspect of ``image`` and at most ``area`` pixels, on the grid
    (rounded down, as the Wan 2.2 reference I2V sizing does)."""
    aspect = image.height / image.width
    height = max(multiple, round(math.sqrt(area * aspect)) // multiple * multiple)
    width = max(multiple, round(math.sqrt(area / aspect)) // multiple * multiple)
    return min(height, MAX_SIDE - MAX_SIDE % multiple), min(width, MAX_SIDE - MAX_SIDE % multiple)


def resolve_request(request: GenerationRequest, info: ModelInfo, *, tokenizer=None) -> ResolvedRequest:
    """Fills defaults and validates every field of ``request`` against model ``info``.

    Args:
        request: The request as given.
        info: The target model (from :func:`engine.model_info.read_model_info`).
        tokenizer: When given, prompts are also checked against the 512-token limit.

    Returns:
        The resolved request.

    Raises:
        ValidationError: naming the first invalid field.
    """
    d = info.defaults
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
        height, width = _size_from_image(image, d.height * d.width, info.spatial_multiple)
    height = _check_side("height", d.height if height is None else height, info.spatial_multiple)
    width = _check_side("width", d.width if width is None else width, info.spatial_multiple)
    frames = _check_int("frames", d.frames if request.frames is None else request.frames, 1, MAX_FRAMES)
    if (frames - 1) % info.temporal_stride:
        raise ValidationError(
            "frames", f"must be {info.temporal_stride}k+1 (e.g. {frames - (frames - 1) % info.temporal_stride}), got {frames}")
    steps = _check_int("steps", d.steps if request.steps is None else request.steps, 1,
                       min(MAX_STEPS, info.num_train_timesteps))
    seed = request.seed if request.seed is not None else secrets.randbelow(SEED_MAX + 1)
    seed = _check_int("seed", seed, 0, SEED_MAX)
    guidance = _check_float("guidance", d.guidance if request.guidance is None else request.guidance,
                            *GUIDANCE_RANGE)
    if info.is_moe:
        low = request.guidance_low if request.guidance_low is not None else d.guidance_low
        guidance_low = _check_float("guidance_low", guidance if low is None else low, *GUIDANCE_RANGE)
        boundary = info.boundary_ratio if request.boundary is None else request.boundary
        boundary = _check_float("boundary", boundary, 0.0, 1.0, low_open=True)
        if boundary >= 1.0:
            raise ValidationError("boundary", f"must be below 1.0, got {boundary}")
    else:
        for name in ("guidance_low", "boundary"):
            if getattr(request, name) is not None:
                raise ValidationError(name, "this model has a single transformer (no expert switch)")
        guidance_low, boundary = None, None
    shift = _check_float("shift", d.shift if request.shift is None else request.shift, *SHIFT_RANGE,
                         low_open=True)
    fps = _check_int("fps", d.fps if request.fps is None else request.fps, *FPS_RANGE)
    if tokenizer is not None:
        check_prompt_tokens(tokenizer, "prompt", prompt)
        check_prompt_tokens(tokenizer, "negative_prompt", negative)
    return ResolvedRequest(
        prompt=prompt, negative_prompt=negative, height=height, width=width, frames=frames,
        steps=steps, seed=seed, guidance=guidance, guidance_low=guidance_low, shift=shift,
        boundary=boundary, fps=fps, image=bytes(request.image) if request.image is not None else None,
    )


def check_prompt_tokens(tokenizer, field: str, text: str) -> None:
    """Refuses a prompt longer than the text encoder's context instead of truncating it."""
    from relay.engine.text import clean_prompt

    count = len(tokenizer(clean_prompt(text), add_special_tokens=True).input_ids)
    if count > MAX_SEQUENCE_LENGTH:
        raise ValidationError(field, f"is {count} tokens; the limit is {MAX_SEQUENCE_LENGTH}")
