"""Loading a Wan 2.x diffusers directory through the real diffusers / transformers loaders."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from relay.engine.errors import ModelError
from relay.engine.model_info import ModelInfo, read_model_info

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Expert names in step order: the high-noise expert runs the early (noisy) steps.
HIGH, LOW, DENSE = "high_noise", "low_noise", "dense"


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
    """

    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None
    experts: dict[str, torch.nn.Module] = field(default_factory=dict)
    offload: bool = False
    _resident: str | None = field(default=None, repr=False)  # what offload last put on the device

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
                other.to("cpu")
        if self.text_encoder is not None:
            self.text_encoder.to("cpu")
        self._resident = name
        return module.to(self.device)

    def encoder_on_device(self) -> torch.nn.Module:
        """The text encoder on the run device; with offload, the experts leave it first."""
        if self.offload and self._resident != "text_encoder":
            for module in self.experts.values():
                module.to("cpu")
            self.text_encoder.to(self.device)
            self._resident = "text_encoder"
        return self.text_encoder


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

    def __iter__(self):
        return iter(self._model.experts)

    def __len__(self) -> int:
        return len(self._model.experts)


def expert_folders(info: ModelInfo) -> dict[str, str]:
    """Expert name -> transformer sub-folder (``high_noise``: ``transformer``, ...)."""
    return dict(zip((HIGH, LOW), info.experts)) if info.is_moe else {DENSE: info.experts[0]}


def load_tokenizer(info: ModelInfo):
    """The model's tokenizer (cheap: used to check prompt lengths before any weights load)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(info.path / "tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot load the tokenizer: {exc}") from exc


def load_text_encoder(info: ModelInfo, *, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The UMT5 text encoder of ``info`` on ``device`` (eval mode, no gradients)."""
    from transformers import UMT5EncoderModel

    try:
        encoder = UMT5EncoderModel.from_pretrained(info.path / "text_encoder", dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot load the text encoder: {exc}") from exc
    return encoder.to(device).eval().requires_grad_(False)


def load_model(model: str | os.PathLike | ModelInfo, *, dtype: str | None = None,
               device: str | torch.device | None = None, experts: tuple[str, ...] | None = None,
               text_encoder: bool = True, vae: bool = True, tokenizer=None,
               offload: bool = False) -> LoadedModel:
    """Loads a Wan 2.x diffusers directory offline.

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
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    info = model if isinstance(model, ModelInfo) else read_model_info(model)
    device = torch.device(device) if device is not None else default_device()
    dtype_name = dtype or default_dtype(device)
    if dtype_name not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype_name!r}")
    torch_dtype = DTYPES[dtype_name]
    path: Path = info.path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the network
    folders = expert_folders(info)
    wanted = experts if experts is not None else tuple(folders)
    unknown = set(wanted) - set(folders)
    if unknown:
        raise ModelError(f"{path}: no expert named {sorted(unknown)}; this model has {sorted(folders)}")
    home = torch.device("cpu") if offload else device  # where the big modules rest
    try:
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info)
        encoder = None
        if text_encoder:
            encoder = load_text_encoder(info, dtype=torch_dtype, device=home)
        decoder = None
        if vae:
            decoder = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
            decoder = decoder.to(device).eval().requires_grad_(False)
        loaded = {}
        for name in wanted:
            module = WanTransformer3DModel.from_pretrained(path, subfolder=folders[name], dtype=torch_dtype)
            loaded[name] = module.to(home).eval().requires_grad_(False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load model components: {exc}") from exc
    return LoadedModel(info=info, device=device, dtype=torch_dtype, tokenizer=tokenizer,
                       text_encoder=encoder, vae=decoder, experts=loaded, offload=offload)


def build_scheduler(info: ModelInfo, shift: float):
    """The model's scheduler from its own config, with the flow shift of the request."""
    import diffusers

    cls = getattr(diffusers, info.scheduler_class, None)
    if cls is None:
        raise ModelError(f"{info.path}: unknown scheduler class {info.scheduler_class!r}")
    config = dict(cls.load_config(info.path / "scheduler"))
    key = "flow_shift" if "flow_shift" in config or info.scheduler_class.startswith("UniPC") else "shift"
    return cls.from_config(config, **{key: shift})
