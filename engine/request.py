"""Generation requests: what a user asks for, and the fully resolved, validated form.

Every front end (CLI, gRPC, Python) builds a :class:`GenerationRequest` and calls
:func:`resolve_request`, which hands it to the model family's rules (the spec's ``resolve``;
for Wan :mod:`engine.models.wan.rules`): unset fields take the model's defaults and every field
is checked before any weights are used. Errors name the field
(:class:`engine.errors.ValidationError`). Nothing is rounded or clamped silently: a value that
the model cannot take is refused. The field checks shared by every family live here.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from relay.engine.errors import ValidationError

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
#: The source of a resolved field the request itself gave.
REQUEST = "request"
#: A seed that asks for a random one, on every front end (CLI, gRPC, Python); so does ``None``.
RANDOM_SEED = -1


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """A generation as asked for; ``None`` means "use the model's default".

    Attributes:
        prompt: What the video shows. Required, at most 512 text-encoder tokens.
        negative_prompt: What to steer away from (used with guidance > 1).
        height, width: Output size in pixels; multiples of the model's spatial multiple.
        frames: Number of frames, ``4k + 1``.
        steps: Denoising steps, 1..1000.
        seed: 0..2**63-1; ``None`` or -1 picks one at random (reported in the resolved request).
        guidance: Classifier-free guidance for the high-noise expert (or the only one);
            1.0 turns guidance off.
        guidance_low: Guidance for the low-noise expert (MoE models only).
        shift: Flow-matching sigma shift of the scheduler.
        boundary: Boundary ratio overriding the model's (MoE models only).
        fps: Frames per second of the written video.
        image: Encoded image bytes (PNG, JPEG, WebP) for image-to-video.
        solver: ``unipc`` or ``euler`` (:mod:`engine.solvers`); default: the folder's scheduler.
        timesteps: An explicit schedule, before the flow shift (needs ``euler``); ``steps``
            defaults to its length.
        preset: A named recipe of the model family that sets the fields it names (for Wan:
            ``lightning``, the 4-step distill recipe); fields given here override it.
        loras: LoRAs to fuse, in stacking order (:class:`engine.lora.LoraRef`).
        cache: Feature cache of every expert (:mod:`engine.caches`: ``none``, ``fbc:T``,
            ``mag:...``, ``taylorseer:...``); default none.
        cache_high, cache_low: The high- / low-noise expert's cache, overriding ``cache``
            (MoE models only).
        guidance_terms: The family's guidance beyond ``guidance``, as ``name=value`` pairs
            (``"audio=7,stg=1"``) or a mapping: LTX-2's audio, spatio-temporal and modality
            scales and rescales (:mod:`engine.models.ltx2.rules`); Wan has none.
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
    solver: str | None = None
    timesteps: tuple[float, ...] | None = None
    preset: str | None = None
    loras: tuple = ()
    cache: str | None = None
    cache_high: str | None = None
    cache_low: str | None = None
    guidance_terms: str | Mapping | None = None


@dataclass(frozen=True, kw_only=True)
class ResolvedRequest:
    """A validated request with every field concrete. ``image`` stays as the encoded bytes.

    ``sources`` says where each setting came from: ``request`` (given), ``relay.json``, a folder
    config (``scheduler/scheduler_config.json``, ``model_index.json``), the family's reference
    table, or ``random`` (the seed). ``solver`` is the solver's name, ``timesteps`` the explicit
    schedule (``None``: the solver's own spacing), ``loras`` the checked
    :class:`engine.lora.LoraChoice` entries (dicts, as shipped, are turned back into them),
    ``caches`` the canonical feature-cache spec of each expert (``{expert: "fbc:0.05"}``),
    ``guidance_terms`` every guidance term of the family with its value (``{}`` for Wan).
    """

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
    solver: str = "unipc"
    timesteps: tuple[float, ...] | None = None
    loras: tuple = ()
    caches: Mapping[str, str] = field(default_factory=dict)
    guidance_terms: Mapping[str, object] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from relay.engine.lora import LoraChoice

        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        object.__setattr__(self, "loras", tuple(
            lora if isinstance(lora, LoraChoice) else LoraChoice.from_dict(lora) for lora in self.loras))

    def to_dict(self, *, with_image: bool = False) -> dict:
        """Plain dict of the settings (the image is dropped unless asked for)."""
        data = asdict(self)
        data["sources"] = dict(self.sources)
        data["caches"] = dict(self.caches)
        data["guidance_terms"] = dict(self.guidance_terms)
        if not with_image:
            data["image"] = None
        return data


def guidance_terms_text(terms: Mapping) -> str:
    """Resolved guidance terms as the ``name=value,...`` text a request may give back
    (block lists joined by ``+``); ``""`` for none."""
    return ",".join(f"{name}={'+'.join(map(str, value)) if isinstance(value, (tuple, list)) else f'{value:g}'}"
                    for name, value in terms.items())


def check_int(field: str, value, low: int, high: int) -> int:
    """``value`` if it is an integer in ``[low, high]``, else a :class:`ValidationError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValidationError(field, f"must be between {low} and {high}, got {value}")
    return value


def check_float(field: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float if it is finite and in range (``(low`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, f"must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValidationError(field, f"must be finite, got {value}")
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ValidationError(field, f"must be in {bracket}{low}, {high}], got {value}")
    return value


def check_side(field: str, value: int, multiple: int) -> int:
    """A height or width: an integer multiple of ``multiple``, at most :data:`MAX_SIDE`."""
    check_int(field, value, multiple, MAX_SIDE)
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
    from PIL import Image, ImageOps, UnidentifiedImageError

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
            # A photo's EXIF orientation is how it is meant to be seen (phones store it rotated).
            return ImageOps.exif_transpose(probe).convert("RGB")
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValidationError("image", f"cannot be decoded as an image ({type(exc).__name__})") from None


def resolve_request(request: GenerationRequest, info, *, tokenizer=None) -> ResolvedRequest:
    """Fills defaults and validates every field of ``request`` against model ``info`` with the
    rules of the model's family.

    Args:
        request: The request as given.
        info: The target model (from :func:`engine.model_info.read_model_info`).
        tokenizer: When given, prompts are also checked against the text encoder's context.

    Returns:
        The resolved request (``sources`` says where each setting came from).

    Raises:
        ValidationError: naming the first invalid field.
    """
    return info.spec.resolve(request, info, tokenizer=tokenizer)


def check_prompts(resolved: ResolvedRequest, info, tokenizer) -> None:
    """Refuses prompts the model's text encoder cannot take whole (e.g. over 512 UMT5 tokens);
    for a request resolved without a tokenizer (the CLI checks every flag first).

    Raises:
        ValidationError: ``prompt`` or ``negative_prompt``.
    """
    info.spec.check_prompts(tokenizer, resolved)
