"""Wan LoRA files in the layouts users have, converted to diffusers module names.

* **diffusers / PEFT**: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B`` (and
  ``lora_B.bias``), alpha in the file's ``lora_adapter_metadata`` when it has one;
* **original Wan / ComfyUI**: ``diffusion_model.blocks.0.self_attn.q.lora_down.weight``,
  ``lora_up``, ``alpha``, and the extra keys step-distill LoRAs carry: ``diff_b`` (bias deltas)
  and ``diff`` (full deltas, e.g. of the norm scales);
* **kohya / musubi-tuner**: ``lora_unet_blocks_0_self_attn_q.lora_down.weight``.

Diffusers' own converter (``WanLoraLoaderMixin.lora_state_dict``) reads each of them; this
module only adds what it does not load: ``diff`` / norm ``diff_b`` keys (diffusers drops them)
and kohya files that train a subset of the layers (diffusers' musubi converter expects every
layer; their names are translated to the original layout, which diffusers reads in any subset).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from relay.engine.lora import LoraError, LoraWeights, ModuleDelta, alpha_scales

#: Original Wan module names -> diffusers' (``{i}``: block index), for the keys converted here.
_BLOCK_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_TOP_NAMES = {
    "head.head": "proj_out", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
}
#: kohya's underscore names -> the original dotted ones.
_KOHYA = [
    (re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^blocks_(\d+)_ffn_(0|2)$"), r"blocks.\1.ffn.\2"),
    (re.compile(r"^blocks_(\d+)_norm3$"), r"blocks.\1.norm3"),
    (re.compile(r"^head_head$"), "head.head"),
    (re.compile(r"^(text_embedding|time_embedding)_(0|2)$"), r"\1.\2"),
    (re.compile(r"^time_projection_1$"), "time_projection.1"),
]
ORIGINAL, KOHYA, DIFFUSERS = "wan", "kohya", "diffusers"


def layout(keys) -> str:
    """The layout of a LoRA file's keys: ``wan``, ``kohya`` or ``diffusers``."""
    keys = list(keys)
    if any(k.startswith("diffusion_model.") for k in keys):
        return ORIGINAL
    if any(k.startswith("lora_unet_") for k in keys):
        return KOHYA
    return DIFFUSERS


def diffusers_name(original: str) -> str | None:
    """The diffusers module name of an original Wan module name, or ``None``."""
    if original in _TOP_NAMES:
        return _TOP_NAMES[original]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", original)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def _kohya_to_original(raw: dict, path) -> dict:
    out = {}
    for key, value in raw.items():
        stem, dot, rest = key[len("lora_unet_"):].partition(".")
        for pattern, replacement in _KOHYA:
            if pattern.match(stem):
                out["diffusion_model." + pattern.sub(replacement, stem) + dot + rest] = value
                break
        else:
            raise LoraError(path, "is not a Wan transformer layer", key=key)
    return out


def _split_extras(raw: dict, path) -> tuple[dict, dict[str, ModuleDelta]]:
    """Takes the keys diffusers drops (``diff``, and ``diff_b`` of norms) out of an original-
    layout dict and converts them; all-zero deltas (distill LoRAs ship some) change nothing."""
    keep, extras = {}, {}
    for key, value in raw.items():
        name = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
        module, _, suffix = name.rpartition(".")
        dropped = (suffix == "diff" and module != "head.head") or (suffix == "diff_b" and "norm" in module)
        if not dropped:
            keep[key] = value
            continue
        target = diffusers_name(module)
        if target is None:
            raise LoraError(path, "is a delta of a parameter Relay cannot map to a module", key=key)
        if not bool(value.count_nonzero()):
            continue
        delta = extras.setdefault(target, ModuleDelta())
        if suffix == "diff":
            delta.weight = value
        else:
            delta.bias = value
    return keep, extras


def _first_key(exc: BaseException) -> str | None:
    found = re.search(r"'([^']+)'", str(exc))
    return found.group(1) if found else None


def lora_weights(path: Path) -> LoraWeights:
    """Reads a Wan LoRA file (any layout above) as diffusers module deltas.

    Raises:
        LoraError: not a readable safetensors file, no LoRA keys, or a key diffusers' converter
            and this module cannot place (named).
    """
    from diffusers import WanPipeline
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        raw = load_file(path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(path, f"cannot be read as safetensors ({str(exc).splitlines()[0][:200]})") from None
    if not raw:
        raise LoraError(path, "holds no tensors")
    fmt = layout(raw)
    extras: dict[str, ModuleDelta] = {}
    try:
        if fmt == KOHYA:
            try:
                converted = WanPipeline.lora_state_dict(dict(raw))
            except (KeyError, ValueError, IndexError):  # a subset of the layers: the original layout reads it
                raw = _kohya_to_original(raw, path)
                raw, extras = _split_extras(raw, path)
                converted = WanPipeline.lora_state_dict(raw)
        elif fmt == ORIGINAL:
            raw, extras = _split_extras(raw, path)
            converted = WanPipeline.lora_state_dict(raw) if raw else {}
        else:
            converted = WanPipeline.lora_state_dict(dict(raw))
    except LoraError:
        raise
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        key = _first_key(exc)
        raise LoraError(path, "is not a Wan LoRA this layout can place "
                        f"({type(exc).__name__})", key=key) from None
    modules = _modules(converted, path)
    if fmt == DIFFUSERS:
        config = _adapter_config(metadata)
        if config:
            if config.get("use_dora"):
                raise LoraError(path, "is a DoRA adapter; only LoRA is supported")
            alpha_scales(modules, config)
    for name, extra in extras.items():
        delta = modules.setdefault(name, ModuleDelta())
        if extra.weight is not None:
            delta.weight = extra.weight
        if extra.bias is not None:
            delta.bias = extra.bias if delta.bias is None else delta.bias + extra.bias
    if not modules:
        raise LoraError(path, "holds no LoRA weights")
    return LoraWeights(modules=modules, format=fmt)


def _adapter_config(metadata: dict) -> dict | None:
    """The transformer's PEFT ``LoraConfig`` dict from a diffusers file's metadata, if any."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    prefixed = {k[len("transformer."):]: v for k, v in data.items() if k.startswith("transformer.")}
    return prefixed or data


def _modules(converted: dict, path) -> dict[str, ModuleDelta]:
    modules: dict[str, ModuleDelta] = {}
    alphas: dict[str, float] = {}
    for key, value in converted.items():
        name = key
        for prefix in ("transformer.", "base_model.model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            if re.match(r"(text_encoder|unet|transformer_2)\.", key):
                raise LoraError(path, "targets a component other than the transformer", key=key)
        for suffix, slot in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "bias"),
                             (".lora_down.weight", "down"), (".lora_up.weight", "up")):
            if name.endswith(suffix):
                setattr(modules.setdefault(name[: -len(suffix)], ModuleDelta()), slot, value)
                break
        else:
            if name.endswith(".alpha"):
                alphas[name[: -len(".alpha")]] = float(value)
            else:
                raise LoraError(path, "is not a LoRA key (lora_A / lora_B weights or lora_B bias)", key=key)
    for name, alpha in alphas.items():
        delta = modules.get(name)
        if delta is not None and delta.down is not None:
            delta.scale = alpha / delta.down.shape[0]
    return modules
