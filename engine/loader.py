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
            Their host copies stay (pinned on CUDA, packed into 1 GiB buffers: pinning tensor
            by tensor would round each up to a power of two, ~1.5x the bytes): a module arrives
            with asynchronous copies from pinned memory and leaves by dropping its device copy --
            frozen weights are never copied back. On CUDA the denoise loop asks for the next
            expert one step ahead (:meth:`prefetch`): where the device has room for both, its
            copies run on a stream of their own during the last step of the expert before it.
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
    _prefetched: set = field(default_factory=set, repr=False)  # resident modules a prefetch brought
    #: Prefetches started, skipped for want of free device memory, and abandoned while
    #: copying (an allocation had to flush the allocator's cache, or failed).
    prefetches: dict = field(default_factory=lambda: {"started": 0, "no_room": 0, "fell_back": 0}, repr=False)

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
        if self.text_encoder is not None and "text_encoder" in self._host:  # an offloaded one
            self._leave("text_encoder", self.text_encoder)
        self._resident = name
        return self._arrive(name, module)

    def prefetch(self, name: str) -> bool:
        """With offload on CUDA: starts copying expert ``name`` to the device on a copy stream
        of its own, so that it arrives while the resident expert computes; :meth:`on_device`
        then only orders the compute stream after those copies.

        Call it when the resident expert has already run a step of this request (its
        activations then hold their memory in the allocator's cache, which the copies do not
        touch: they take device memory no one holds, and start only where that fits the whole
        expert, :func:`prefetch_fits`). Returns whether copies started: ``False`` off CUDA,
        without offload, for the resident or a missing module, or without room (counted in
        :attr:`prefetches`)."""
        module = self.experts.get(name)
        if (module is None or not self.offload or self.device.type != "cuda" or self._resident == name
                or self._incoming is not None):
            return False
        host = self._host_copies(name, module)
        need = sum(t.numel() * t.element_size() for t in host.values())
        if not prefetch_fits(need, torch.cuda.mem_get_info(self.device)[0]):
            self.prefetches["no_room"] += 1
            return False
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        retries = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        copies: dict = {}
        started = False
        try:
            with torch.cuda.stream(self._copy_stream):  # allocated from the copy stream's own pool
                for tensor, copy in host.items():
                    copies[tensor] = copy.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            # An allocation that found no free memory made the allocator release every cached
            # block, the activations' too: the next forward would have to find them again.
            started = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0) == retries
        except torch.OutOfMemoryError:
            pass
        finally:
            if not started:  # the switch will copy as before
                self._copy_stream.synchronize()
                copies.clear()
                torch.cuda.empty_cache()
                self.prefetches["fell_back"] += 1
        if not started:
            return False
        self._incoming = _Prefetch(name, copies, done)
        self.prefetches["started"] += 1
        return True

    def begin_run(self) -> None:
        """A new run starts here: a prefetch an earlier run asked for and never took is let go,
        and with offload on CUDA the allocator's cache goes back to the device, so what the
        prefetch may take (device memory no one holds) is not what an earlier, larger request
        left cached; this run's activations are cached again before its prefetch is asked for."""
        self.drop_prefetch()
        if self.offload and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def drop_prefetch(self) -> None:
        """Lets go of a prefetch no step took (a run that stopped before the switch): its
        device memory goes back to the device. A no-op when there is none."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.done.synchronize()
            incoming.copies.clear()
            torch.cuda.empty_cache()  # the copy stream's pool: back to the device for everyone

    def park(self, name: str) -> None:
        """With offload: takes module ``name`` off the run device, so that its host copy is
        what it holds (the LoRA fuse changes that copy; the next arrival brings it)."""
        module = self.experts.get(name) if name != "text_encoder" else self.text_encoder
        if not self.offload or module is None or (name == "text_encoder" and name not in self._host):
            return
        self._leave(name, module)
        if self._resident == name:
            self._resident = None

    def encoder_on_device(self) -> torch.nn.Module:
        """The text encoder where it encodes: with offload, on the run device, the experts
        leaving it first -- unless it was placed elsewhere on purpose (``--text-encoder cpu``
        or ``fsdp``: set after loading, so offload never took it over) and stays there."""
        if self.offload and "text_encoder" in self._host and self._resident != "text_encoder":
            for name, module in self.experts.items():
                self._leave(name, module)
            self._arrive("text_encoder", self.text_encoder)
            self._resident = "text_encoder"
        return self.text_encoder

    def _tensors(self, module: torch.nn.Module):
        yield from module.parameters()
        yield from module.buffers()

    def _host_copies(self, name: str, module: torch.nn.Module) -> dict:
        """``{tensor: host copy}`` of ``module`` (made once; on CUDA pinned, so that copies to
        the device are asynchronous, and packed into a few large buffers, :func:`pack_host`)."""
        if name not in self._host:
            tensors = list(self._tensors(module))
            if self.device.type == "cuda":
                self._host[name] = pack_host(tensors, pin=True)
            else:
                self._host[name] = {t: t.data for t in tensors}
        return self._host[name]

    def _arrive(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Puts ``module`` on the run device: the copies a :meth:`prefetch` made, once the
        compute stream is ordered after them, else asynchronous copies from its (pinned) host
        copy."""
        if self._incoming is not None and self._incoming.name == name:
            incoming, self._incoming = self._incoming, None
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(incoming.done)
            for tensor, copy in incoming.copies.items():
                copy.record_stream(compute)  # made on the copy stream, used and freed on this one
                tensor.data = copy
            self._prefetched.add(name)
            return module
        self.drop_prefetch()  # another module was asked for: its memory first
        for tensor, host in self._host_copies(name, module).items():
            tensor.data = host.to(self.device, non_blocking=True)
        return module

    def _leave(self, name: str, module: torch.nn.Module) -> None:
        """Takes ``module`` off the run device: its tensors point at their host copies again and
        the device copies are freed (frozen weights: nothing to copy back); a prefetch of it
        still in flight is waited for and dropped (a LoRA fuse is about to change its host copy).
        Copies a prefetch brought go back to the device, not to the copy stream's cache, so that
        the next prefetch finds them free."""
        if self._incoming is not None and self._incoming.name == name:
            self.drop_prefetch()
        for tensor, host in self._host_copies(name, module).items():
            tensor.data = host
        if name in self._prefetched:
            self._prefetched.discard(name)
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class _Prefetch:
    """An expert whose device copies are being made on the copy stream."""

    name: str
    copies: dict  # {tensor: its device copy}
    done: object  # torch.cuda.Event recorded after the copies


#: Device memory a prefetch leaves free beyond the expert's bytes (allocator rounding, other
#: processes, the CUDA context growing), as a fraction of those bytes.
PREFETCH_MARGIN = 0.05


def prefetch_fits(need: int, free: int, *, margin: float = PREFETCH_MARGIN) -> bool:
    """Whether an expert of ``need`` bytes may be copied in beside the resident one.

    Args:
        need: The incoming expert's bytes.
        free: Device memory that no process holds (``torch.cuda.mem_get_info``): the copies
            take only that, never the allocator's cache, where the resident expert's
            activations keep the memory its next forward reuses.
        margin: A further fraction of ``need`` left free.
    """
    return need + int(margin * need) <= free


#: Pinned host buffers are allocated in chunks of this size (a power of two: the pinned
#: allocator rounds every allocation up to one).
HOST_CHUNK_BYTES = 1 << 30
_ALIGN = 64


def pack_host(tensors: list, *, pin: bool, chunk_bytes: int = HOST_CHUNK_BYTES) -> dict:
    """Host copies of ``tensors`` as views into a few large buffers: each tensor's ``data``
    becomes its copy, and the mapping ``{tensor: copy}`` is returned.

    Tensors are placed largest first into the first buffer with room (each buffer
    ``chunk_bytes``, or the next power of two above the largest tensor), and each buffer is
    filled and the originals let go before the next is allocated, so the host holds at most one
    buffer more than the module. ``pin``: page-locked buffers (for asynchronous copies to a GPU).
    """
    out = {}
    for tensor in tensors:  # a packed view is contiguous: these keep their own strides (rare)
        if not tensor.data.is_contiguous():
            out[tensor] = tensor.data = tensor.data.pin_memory() if pin else tensor.data
    packed = [i for i, tensor in enumerate(tensors) if tensor not in out]
    if not packed:
        return {t: out[t] for t in tensors}
    sizes = [t.numel() * t.element_size() for t in tensors]
    chunk = max(chunk_bytes, 1 << (max(sizes[i] for i in packed) - 1).bit_length())
    order = sorted(packed, key=lambda i: -sizes[i])
    used: list[int] = []  # bytes used in each buffer
    places: list[list[tuple[int, int]]] = []  # per buffer: (tensor index, offset)
    for i in order:
        size = -(-sizes[i] // _ALIGN) * _ALIGN
        for b, taken in enumerate(used):
            if taken + size <= chunk:
                places[b].append((i, taken))
                used[b] += size
                break
        else:
            places.append([(i, 0)])
            used.append(size)
    for b, members in enumerate(places):
        buffer = torch.empty(used[b], dtype=torch.uint8, pin_memory=pin)
        for i, offset in members:
            tensor = tensors[i]
            copy = buffer[offset:offset + sizes[i]].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor.data)
            tensor.data = copy  # the original goes once nothing else holds it
            out[tensor] = copy
    return {t: out[t] for t in tensors}


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
