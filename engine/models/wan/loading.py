"""Loading a Wan 2.x diffusers folder through the real diffusers / transformers loaders, its
scheduler from the folder's own config, the expert of every step, and the meta-device builds
that FSDP2 shards (:mod:`parallel.fsdp`)."""

from __future__ import annotations

import os
from pathlib import Path

from relay.engine.errors import ModelError
from relay.engine.experts import DENSE, HIGH, LOW

#: Wan 2.2's released scheduler config (every A14B / 5B folder ships this one), used by the
#: planner for catalog models that have no folder to read.
REFERENCE_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                       "use_flow_sigmas": True, "num_train_timesteps": 1000}


def expert_folders(info) -> dict[str, str]:
    """Expert name -> transformer sub-folder (``high_noise``: ``transformer``, ...)."""
    return dict(zip((HIGH, LOW), info.experts)) if info.is_moe else {DENSE: info.experts[0]}


def load_tokenizer(info):
    """The model's tokenizer (cheap: used to check prompt lengths before any weights load)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(info.path / "tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot load the tokenizer: {exc}") from exc


def load_text_encoder(info, *, dtype, device):
    """The UMT5 text encoder of ``info`` on ``device`` (eval mode, no gradients)."""
    from transformers import UMT5EncoderModel

    try:
        # Straight onto the device, tensor by tensor: no whole host copy of the 10.6 GiB encoder.
        encoder = UMT5EncoderModel.from_pretrained(info.path / "text_encoder", dtype=dtype,
                                                   device_map={"": str(device)})
    except (OSError, ValueError) as exc:
        raise ModelError(f"{info.path}: cannot load the text encoder: {exc}") from exc
    return encoder.eval().requires_grad_(False)


def load(info, *, dtype, device, experts=None, text_encoder: bool = True, vae: bool = True,
         tokenizer=None, offload: bool = False):
    """Loads the components of a Wan folder offline (see :func:`engine.loader.load_model`)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from relay.engine.loader import LoadedModel

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
        encoder = load_text_encoder(info, dtype=dtype, device=home) if text_encoder else None
        decoder = None
        if vae:
            decoder = AutoencoderKLWan.from_pretrained(path, subfolder="vae", dtype=torch.float32)
            decoder = decoder.to(device).eval().requires_grad_(False)
        loaded = {}
        for name in wanted:
            # Built on the meta device and filled tensor by tensor straight on ``home`` (a 26.6 GiB
            # expert never sits whole in host memory on its way to a GPU).
            module = WanTransformer3DModel.from_pretrained(path, subfolder=folders[name], dtype=dtype,
                                                           device_map={"": str(home)})
            loaded[name] = module.eval().requires_grad_(False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load model components: {exc}") from exc
    return LoadedModel(info=info, device=device, dtype=dtype, tokenizer=tokenizer,
                       text_encoder=encoder, vae=decoder, experts=loaded, offload=offload)


def build_scheduler(info, shift: float, solver: str | None = None):
    """The scheduler of ``solver`` (default: the folder's own, UniPC for Wan 2.2) with the flow
    shift of the request, from the folder's own config (see :func:`engine.solvers.build_scheduler`)."""
    from relay.engine.solvers import _scheduler_class, build_scheduler as build

    cls = _scheduler_class(info.scheduler_class, str(info.path))
    config = dict(cls.load_config(info.path / "scheduler"))
    return build(info.scheduler_class, config, solver=solver, shift=shift,
                 num_train_timesteps=info.num_train_timesteps, where=str(info.path))


def expert_schedule(info, steps: int, shift: float, boundary: float | None, *, solver: str | None = None,
                    timesteps=None) -> list[str]:
    """The expert of each of ``steps`` steps: high-noise while ``t >= boundary x
    num_train_timesteps`` on the solver's timesteps (the explicit ``timesteps`` after the shift,
    when given), then low-noise; a dense model runs every step on its one transformer.
    ``info`` ``None``: the released scheduler config."""
    from relay.engine.solvers import build_scheduler as build, experts_for, set_schedule

    if boundary is None:
        return [DENSE] * (len(timesteps) if timesteps else steps)
    if info is None:
        config = dict(REFERENCE_SCHEDULER)
        name = config.pop("_class_name")
        train = REFERENCE_SCHEDULER["num_train_timesteps"]
        scheduler = build(name, config, solver=solver, shift=shift, num_train_timesteps=train,
                          where="the Wan 2.2 reference scheduler")
    else:
        scheduler, train = build_scheduler(info, shift, solver), info.num_train_timesteps
    set_schedule(scheduler, steps, timesteps)
    return experts_for(scheduler.timesteps.tolist(), boundary, train, high=HIGH, low=LOW, dense=DENSE)


def _rope(module):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    # The module keeps its constructor arguments; theta is never overridden by the model.
    return WanRotaryPosEmbed(module.attention_head_dim, module.patch_size, module.max_seq_len)


def transformer_on_meta(folder: Path):
    """A ``WanTransformer3DModel`` from ``folder``'s config, built on the meta device."""
    import torch
    from diffusers import WanTransformer3DModel

    from relay.engine.models.spec import MetaModel

    config = WanTransformer3DModel.load_config(folder)
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    # diffusers keeps these fp32 for any dtype, matching on any dotted name component.
    keep = frozenset(getattr(model, "_keep_in_fp32_modules", None) or [])
    return MetaModel(module=model, blocks=tuple(model.blocks), keep_fp32=keep,
                     weights_stem="diffusion_pytorch_model", rebuild_buffers={"WanRotaryPosEmbed": _rope})


def text_encoder_on_meta(folder: Path, *, dtype):
    """A ``UMT5EncoderModel`` from ``folder``'s config, built on the meta device; its fp32
    modules follow transformers' rules (``_keep_in_fp32_modules`` under fp16,
    ``_keep_in_fp32_modules_strict`` under fp16 and bf16)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from relay.engine.models.spec import MetaModel

    config = UMT5Config.from_pretrained(folder)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    keep = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return MetaModel(module=model, blocks=tuple(model.encoder.block), keep_fp32=frozenset(keep),
                     weights_stem="model")


def meta_transformer(info, expert: str):
    """The transformer of ``expert`` (``high_noise``, ``low_noise`` or ``dense``) on the meta
    device, with its folder (``(MetaModel, folder)``)."""
    folder = info.path / expert_folders(info)[expert]
    return transformer_on_meta(folder), folder


def meta_text_encoder(info, *, dtype):
    """The text encoder on the meta device, with its folder (``(MetaModel, folder)``)."""
    folder = info.path / "text_encoder"
    return text_encoder_on_meta(folder, dtype=dtype), folder
