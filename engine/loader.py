"""Loaded models: the components on their devices (:class:`LoadedModel`), expert offload, and
:func:`load_model`, which hands the folder to its family's loader (the spec's ``load``; for Wan
:mod:`engine.models.wan.loading`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from relay.engine.errors import ModelError
from relay.engine.experts import DENSE, HIGH, LOW
from relay.engine.model_info import ModelInfo, read_model_info

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

__all__ = ["DENSE", "DTYPES", "HIGH", "LOW", "DeviceExperts", "LoadedModel", "default_device",
           "default_dtype", "load_model", "load_tokenizer", "quiet_libraries"]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> str:
    """bf16 on accelerators; fp32 on CPU, where bf16 matmuls are slow and inexact."""
    return "fp32" if device.type == "cpu" else "bf16"


@dataclass(kw_only=True)
class LoadedModel:
    """A loaded model: components on their devices plus the static :class:`ModelInfo`.

    Attributes:
        experts: ``{"high_noise": ..., "low_noise": ...}`` for MoE models, ``{"dense": ...}``
            otherwise. Any of them may be absent when a stage loads only the expert it runs.
        offload: When true, the text encoder and the experts live on the CPU and only the one
            in use is on ``device`` (one 14B expert at a time: ~28 GB instead of ~67 GB in bf16).
            Their host copies stay (pinned on CUDA): a module arrives with asynchronous copies
            from pinned memory and leaves by dropping its device copy -- frozen weights are never
            copied back. On CUDA the denoise loop asks for the next expert one step ahead
            (:meth:`prefetch`): where the device holds both, its copies run on a stream of their
            own during the last step of the expert before it.
        components: The family's other modules by name (LTX-2: ``connectors``, ``audio_vae``,
            ``vocoder``), on ``device``.
    """

    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None
    experts: dict[str, torch.nn.Module] = field(default_factory=dict)
    offload: bool = False
    components: dict[str, torch.nn.Module] = field(default_factory=dict)
    _resident: str | None = field(default=None, repr=False)  # what offload last put on the device
    _host: dict = field(default_factory=dict, repr=False)  # name -> {tensor: its host copy}
    _incoming: _Prefetch | None = field(default=None, repr=False)  # an expert on its way (CUDA)
    _copy_stream: object = field(default=None, repr=False)
    #: Prefetches started and skipped for want of device memory (run logs and tests).
    prefetches: dict = field(default_factory=lambda: {"started": 0, "no_room": 0}, repr=False)

    def __post_init__(self) -> None:
        if self.offload:  # host copies (pinned on CUDA) once, at load, not at the first switch
            for name, module in [*self.experts.items(), ("text_encoder", self.text_encoder)]:
                if module is not None:
                    self._host_copies(name, module)

    @property
    def spec(self):
        """The family's :class:`~engine.models.spec.ModelSpec`."""
        return self.info.spec

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The expert names this model kind uses, in step order."""
        return (HIGH, LOW) if self.info.is_moe else (DENSE,)

    def on_device(self, name: str) -> torch.nn.Module | None:
        """The expert ``name`` on the run device; with offload, every other module leaves it."""
        module = self.experts.get(name)
        if module is None or not self.offload or self._resident == name:
            return module  # moves happen only when the resident module changes, not every step
        for other_name, other in self.experts.items():
            if other_name != name:
                self._leave(other_name, other)
        if self.text_encoder is not None:
            self._leave("text_encoder", self.text_encoder)
        self._resident = name
        return self._arrive(name, module)

    def prefetch(self, name: str) -> bool:
        """With offload on CUDA: starts copying expert ``name`` to the device on a copy stream
        of its own, so that it arrives while the resident expert computes; :meth:`on_device`
        then only orders the compute stream after those copies. Starts only where the device
        has room for both experts plus the activations seen so far (:func:`prefetch_fits`).
        Returns whether copies started (``False`` off CUDA, without offload, or without room)."""
        module = self.experts.get(name)
        if (module is None or not self.offload or self.device.type != "cuda" or self._resident == name
                or self._incoming is not None):
            return False
        host = self._host_copies(name, module)
        need = sum(t.numel() * t.element_size() for t in host.values())
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        transient = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        if not prefetch_fits(need, free + cached, transient):
            self.prefetches["no_room"] += 1
            return False
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # after what came before
        with torch.cuda.stream(self._copy_stream):
            copies = {tensor: copy.to(self.device, non_blocking=True) for tensor, copy in host.items()}
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        self._incoming = _Prefetch(name, copies, done)
        self.prefetches["started"] += 1
        return True

    def park(self, name: str) -> None:
        """With offload: takes module ``name`` off the run device, so that its host copy is
        what it holds (the LoRA fuse changes that copy; the next arrival brings it)."""
        module = self.experts.get(name) if name != "text_encoder" else self.text_encoder
        if not self.offload or module is None:
            return
        self._leave(name, module)
        if self._resident == name:
            self._resident = None

    def encoder_on_device(self) -> torch.nn.Module:
        """The text encoder on the run device; with offload, the experts leave it first."""
        if self.offload and self._resident != "text_encoder":
            for name, module in self.experts.items():
                self._leave(name, module)
            self._arrive("text_encoder", self.text_encoder)
            self._resident = "text_encoder"
        return self.text_encoder

    def _tensors(self, module: torch.nn.Module):
        yield from module.parameters()
        yield from module.buffers()

    def _host_copies(self, name: str, module: torch.nn.Module) -> dict:
        """``{tensor: host copy}`` of ``module`` (made once; pinned when the device is CUDA, so
        that copies to it are asynchronous)."""
        if name not in self._host:
            pin = self.device.type == "cuda"
            self._host[name] = {t: (t.data.pin_memory() if pin and not t.data.is_pinned() else t.data)
                                for t in self._tensors(module)}
            for tensor, host in self._host[name].items():
                tensor.data = host
        return self._host[name]

    def _arrive(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Puts ``module`` on the run device: the copies a :meth:`prefetch` made, once the
        compute stream is ordered after them, else asynchronous copies from its (pinned) host
        copy."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None and incoming.name == name:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(incoming.done)
            for tensor, copy in incoming.copies.items():
                copy.record_stream(compute)  # made on the copy stream, used and freed on this one
                tensor.data = copy
            return module
        if incoming is not None:  # another module was asked for: that prefetch is not needed
            incoming.done.synchronize()
        for tensor, host in self._host_copies(name, module).items():
            tensor.data = host.to(self.device, non_blocking=True)
        return module

    def _leave(self, name: str, module: torch.nn.Module) -> None:
        """Takes ``module`` off the run device: its tensors point at their host copies again and
        the device copies are freed (frozen weights: nothing to copy back); a prefetch of it
        still in flight is waited for and dropped (a LoRA fuse is about to change its host copy)."""
        if self._incoming is not None and self._incoming.name == name:
            self._incoming.done.synchronize()
            self._incoming = None
        for tensor, host in self._host_copies(name, module).items():
            tensor.data = host


@dataclass(frozen=True)
class _Prefetch:
    """An expert whose device copies are being made on the copy stream."""

    name: str
    copies: dict  # {tensor: its device copy}
    done: object  # torch.cuda.Event recorded after the copies


#: Device memory a prefetch leaves free beyond the activations already seen (allocator slack).
PREFETCH_MARGIN = 0.05


def prefetch_fits(need: int, available: int, transient: int, *, margin: float = PREFETCH_MARGIN) -> bool:
    """Whether an expert of ``need`` bytes may be copied in beside the resident one.

    Args:
        need: The incoming expert's bytes.
        available: Device bytes not held by tensors (free on the device plus the allocator's
            cached, unused blocks).
        transient: The largest amount of activation memory seen above what is allocated now
            (peak allocated minus allocated): what the step that overlaps the copy still needs.
        margin: A further fraction of ``need`` kept free.
    """
    return need + transient + int(margin * need) <= available


class DeviceExperts(Mapping):
    """Read-only view ``name -> expert on the run device`` used by the denoise loop; moves
    modules only when the model is offloaded and the expert changes."""

    def __init__(self, model: LoadedModel) -> None:
        self._model = model

    def __getitem__(self, name: str) -> torch.nn.Module:
        module = self._model.on_device(name)
        if module is None:
            raise KeyError(name)
        return module

    def __contains__(self, name: object) -> bool:
        return name in self._model.experts  # no device moves for a membership test

    def prefetch(self, name: str) -> bool:
        """Starts bringing expert ``name`` to the device ahead of its first step
        (:meth:`LoadedModel.prefetch`)."""
        return self._model.prefetch(name)

    def __iter__(self):
        return iter(self._model.experts)

    def __len__(self) -> int:
        return len(self._model.experts)


def load_tokenizer(info: ModelInfo):
    """The model's tokenizer (cheap: used to check prompt lengths before any weights load)."""
    return info.spec.load_tokenizer(info)


def quiet_libraries() -> None:
    """Keeps diffusers/transformers load chatter (per-shard bars, advisories) off the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_model(model: str | os.PathLike | ModelInfo, *, dtype: str | None = None,
               device: str | torch.device | None = None, experts: tuple[str, ...] | None = None,
               text_encoder: bool = True, vae: bool = True, tokenizer=None,
               offload: bool = False) -> LoadedModel:
    """Loads a model directory offline, through its family's loader.

    Args:
        model: Directory, cached hub id, or an already-read :class:`ModelInfo`.
        dtype: ``bf16``, ``fp16`` or ``fp32`` for the transformers and the text encoder
            (default: bf16 on CUDA, fp32 on CPU). The VAE always runs in fp32.
        device: Target device (default: CUDA when available).
        experts: Which experts to load (default: all); a pipeline stage loads only its own.
        text_encoder: Whether to load the UMT5 text encoder.
        vae: Whether to load the VAE.
        tokenizer: An already loaded tokenizer of this model (loaded here otherwise).
        offload: Keep the text encoder and experts on the CPU, moving each to ``device`` only
            while it runs (for a single GPU that cannot hold both 14B experts).

    Raises:
        ModelError: when the directory is not a loadable Wan model.
    """
    info = model if isinstance(model, ModelInfo) else read_model_info(model)
    device = torch.device(device) if device is not None else default_device()
    dtype_name = dtype or default_dtype(device)
    if dtype_name not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    return info.spec.load(info, dtype=DTYPES[dtype_name], device=device, experts=experts,
                          text_encoder=text_encoder, vae=vae, tokenizer=tokenizer, offload=offload)
