"""``DenoiseState``: everything needed to continue a generation from any step boundary.

A snapshot holds the latents, the *complete* solver state (the UniPC multistep history, its
step index, lower-order warm-up count, last sample, ...), the step index, the RNG state and the
conditioning. Resuming in another process, handing a request from the high-noise expert's GPU
group to the low-noise one, and recovering from a crash are the same operation: ship a
snapshot, build a run from it. A snapshot is plain tensors and Python scalars, so it survives
``torch.save`` / ``torch.load(weights_only=True)`` and any pickling transport.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass, field, fields, replace

import torch

STATE_VERSION = 1


@dataclass(kw_only=True)
class Conditioning:
    """Inputs the transformer sees besides the latents.

    Attributes:
        prompt_embeds: ``(1, 512, text_dim)`` in the transformer dtype.
        negative_embeds: Same shape, or ``None`` when no step uses guidance.
        concat: I2V (A14B): mask + image latents concatenated to the noise on channels.
        first_frame: TI2V image mode: clean latents of the first frame, blended in each step.
        first_frame_mask: TI2V image mode: 0 on the first latent frame, 1 elsewhere.
        extra: The family's own conditioning tensors by name (LTX-2: the audio stream's text
            embeddings, the connectors' attention masks, the image condition's token mask);
            shipped, moved and checkpointed like the fields above.
    """

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    concat: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None
    first_frame_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class DenoiseState:
    """A generation between two steps.

    Attributes:
        request: The resolved request settings (``ResolvedRequest.to_dict()``).
        step_index: Index of the next step to run (``0`` = nothing run yet).
        timesteps: The scheduler's timesteps, one per step (computed once, on the CPU; floats:
            an explicit schedule's shifted timesteps need not be integers).
        experts: Expert name for each step, from the boundary (computed once, on the CPU).
        latents: Current latents, fp32.
        solver: Complete scheduler state, as returned by :func:`capture_solver`.
        rng_state: State of the CPU generator that drew the initial noise.
        conditioning: Text (and image) conditioning.
        anchor: With a feature cache: the progress fields (``step_index``, ``latents``,
            ``solver``, ``rng_state``) at the first step of the current expert's cached steps,
            from which a resumed run replays to ``step_index`` (:mod:`engine.caches`); ``None``
            without a cache.
    """

    request: dict
    step_index: int
    timesteps: list[float]
    experts: list[str]
    latents: torch.Tensor
    solver: dict
    rng_state: torch.Tensor
    conditioning: Conditioning
    anchor: dict | None = None

    @property
    def num_steps(self) -> int:
        """Total number of denoising steps."""
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        """True when every step has run."""
        return self.step_index >= self.num_steps

    @property
    def next_expert(self) -> str | None:
        """The expert that runs the next step, or ``None`` when done."""
        return None if self.done else self.experts[self.step_index]

    def advanced(self, progress: dict) -> DenoiseState:
        """This state moved on by a run's :meth:`engine.denoise.DenoiseRun.progress` (the same
        request and conditioning; new step index, latents, solver and RNG state)."""
        unknown = set(progress) - {"step_index", "latents", "solver", "rng_state", "anchor"}
        if unknown:
            raise ValueError(f"not progress fields: {sorted(unknown)}")
        return replace(self, **progress)

    def to_cpu(self) -> DenoiseState:
        """A deep copy with every tensor on the CPU (safe to ship or keep as a checkpoint)."""
        return _map_tensors(self, lambda t: t.detach().to("cpu", copy=True))

    def to_dict(self) -> dict:
        """Plain nested dict of tensors and scalars (the wire / file format)."""
        cpu = self.to_cpu()
        data = {f.name: getattr(cpu, f.name) for f in fields(cpu)}
        data["conditioning"] = {f.name: getattr(cpu.conditioning, f.name) for f in fields(Conditioning)}
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DenoiseState:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        version = data.pop("version", None)
        if version != STATE_VERSION:
            raise ValueError(f"denoise state version {version!r} is not {STATE_VERSION}")
        data["conditioning"] = Conditioning(**data["conditioning"])
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the snapshot to ``path`` (``torch.save`` of :meth:`to_dict`)."""
        torch.save(self.to_dict(), path)

    def to_bytes(self) -> bytes:
        """The snapshot as bytes (for transports that move bytes)."""
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, source: str | os.PathLike | bytes) -> DenoiseState:
        """Reads a snapshot written by :meth:`save` or :meth:`to_bytes`."""
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        return cls.from_dict(torch.load(source, map_location="cpu", weights_only=True))


def _map_tensors(obj, fn):
    """Applies ``fn`` to every tensor inside dataclasses, dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (DenoiseState, Conditioning)):
        return replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn) for f in fields(obj)})
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return copy.deepcopy(obj)


# The scheduler keeps its whole state in instance attributes; its config is immutable and is
# rebuilt from the model directory. Tensors diffusers keeps on the CPU on purpose stay there.
_CONFIG_ATTR = "_internal_dict"
_PORTABLE = (int, float, bool, str, type(None))


def capture_solver(scheduler) -> dict:
    """Complete, portable copy of a diffusers scheduler's mutable state.

    Returns:
        ``{"attrs": {...}, "cpu": [names of tensors that live on the CPU]}``.
    """
    attrs, cpu = {}, []
    for name, value in vars(scheduler).items():
        if name == _CONFIG_ATTR:
            continue
        _check_portable(name, value)
        attrs[name] = _map_tensors(value, lambda t: t.detach().to("cpu", copy=True))
        if torch.is_tensor(value) and value.device.type == "cpu":
            cpu.append(name)
    return {"attrs": attrs, "cpu": cpu}


def restore_solver(scheduler, solver: dict, device: torch.device) -> None:
    """Puts a state from :func:`capture_solver` into a freshly built scheduler of the same config."""
    cpu = set(solver["cpu"])
    for name, value in solver["attrs"].items():
        target = torch.device("cpu") if name in cpu else device
        setattr(scheduler, name, _map_tensors(value, lambda t, d=target: t.to(d, copy=True)))


def _check_portable(name: str, value) -> None:
    if torch.is_tensor(value) or isinstance(value, _PORTABLE):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_portable(name, item)
        return
    raise TypeError(f"scheduler attribute {name!r} has unsupported type {type(value).__name__}")
