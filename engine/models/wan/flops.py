"""Floating-point operations of a Wan transformer forward, computed from its config.

Counted as 2 FLOPs per multiply-add of every matmul; element-wise work (norms, rotary,
activations, softmax) is left out, as is usual for MFU. Per block, with ``S`` video tokens,
``T`` text tokens, model width ``D`` and FFN width ``F``:

* self-attention projections q, k, v, out: ``4 * 2*S*D*D``
* self-attention scores and weighted sum: ``2 * 2*S*S*D``
* cross-attention q and out projections: ``2 * 2*S*D*D``; k, v over the text: ``2 * 2*T*D*D``
* cross-attention scores and weighted sum: ``2 * 2*S*T*D``
* feed-forward (two matmuls): ``2 * 2*S*D*F``

plus the patch embedding and the output projection. For T2V-A14B at 720p x 81 frames
(S = 75,600) this gives about 6.5 PFLOP per forward, self-attention about 72% of it.
"""

from __future__ import annotations

import math


def transformer_flops(config: dict, tokens: int, text_tokens: int = 512) -> dict[str, float]:
    """FLOPs of one forward of a ``WanTransformer3DModel`` with ``config`` on ``tokens`` tokens.

    Returns:
        ``{"total": ..., "self_attention": ..., "cross_attention": ..., "ffn": ...,
        "projections": ...}`` in FLOPs.
    """
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config["ffn_dim"]
    layers = config["num_layers"]
    s, t, d = tokens, text_tokens, width
    self_proj = 4 * 2 * s * d * d
    self_attn = 2 * 2 * s * s * d
    cross = 2 * 2 * s * d * d + 2 * 2 * t * d * d + 2 * 2 * s * t * d
    feed = 2 * 2 * s * d * ffn
    patch = math.prod(config.get("patch_size", (1, 2, 2)))
    io = 2 * s * d * patch * (config["in_channels"] + config["out_channels"])
    return {
        "total": layers * (self_proj + self_attn + cross + feed) + io,
        "self_attention": layers * self_attn,
        "cross_attention": layers * cross,
        "ffn": layers * feed,
        "projections": layers * self_proj + io,
    }


def video_tokens(config: dict, *, height: int, width: int, frames: int, vae_spatial: int = 8,
                 vae_temporal: int = 4) -> int:
    """Tokens of a ``height x width x frames`` video after the VAE and patchify."""
    pt, ph, pw = config.get("patch_size", (1, 2, 2))
    latent_frames = (frames - 1) // vae_temporal + 1
    return (latent_frames // pt) * (height // vae_spatial // ph) * (width // vae_spatial // pw)


def parameter_counts(config: dict) -> dict[str, int]:
    """Parameters of one ``WanTransformer3DModel`` block and of the whole expert, from its config:
    self- and cross-attention (q, k, v, out, with norms), the FFN, the modulation table; plus the
    patch, time and text embeddings and the head."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f = int(config["ffn_dim"])
    block = 8 * (d * d + d) + 2 * d * f + f + d + 4 * d + 2 * d + 6 * d
    patch = math.prod(config["patch_size"])
    embed = int(config["in_channels"]) * patch * d + d
    time = int(config["freq_dim"]) * d + d + d * d + d + d * 6 * d + 6 * d
    text = int(config["text_dim"]) * d + d + d * d + d
    head = d * int(config["out_channels"]) * patch + 2 * d
    return {"block": block, "expert": int(config["num_layers"]) * block + embed + time + text + head}
