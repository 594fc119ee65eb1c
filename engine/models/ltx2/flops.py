"""Floating-point operations of an LTX-2 transformer forward, computed from its config.

2 FLOPs per multiply-add of every matmul; element-wise work is left out (as for Wan,
:mod:`engine.models.wan.flops`). Each block has two streams: video (width ``D = heads x
head_dim``, ``S`` tokens) and audio (width ``A = heads x audio_head_dim``, ``Sa`` tokens), with
``T`` text tokens (the connectors' 1024). Per block:

* video self-attention ``4*2*S*D*D + 2*2*S*S*D``; audio self-attention ``4*2*Sa*A*A + 2*2*Sa*Sa*A``
* text cross-attention of each stream (q, out over its tokens, k, v over the text's, scores)
* audio-to-video (video queries, audio keys, width ``A``) and video-to-audio (audio queries, video
  keys) cross-attention: projections ``2*S*D*A`` / ``2*Sa*A*A`` per side and ``2*2*S*Sa*A`` each
* feed-forward ``2*2*S*D*4D`` and ``2*2*Sa*A*4A``

At 768x512x121 (S = 6,144 video tokens, Sa = 126 audio tokens) the video stream is almost all of
it; its self-attention is a smaller share than Wan's at 720p (fewer tokens per video).
"""

from __future__ import annotations

#: Tokens of the text stream (the pipeline pads the prompt to 1024; the connectors keep the length).
TEXT_TOKENS = 1024
FFN_MULT = 4


def transformer_flops(config: dict, tokens: int, text_tokens: int = TEXT_TOKENS, *,
                      audio_tokens: int = 0) -> dict[str, float]:
    """FLOPs of one forward of an ``LTX2VideoTransformer3DModel`` with ``config``.

    Args:
        config: The transformer's config.
        tokens: Video tokens.
        text_tokens: Text tokens.
        audio_tokens: Audio tokens (25 per second of video for LTX-2).

    Returns:
        ``{"total", "self_attention", "cross_attention", "ffn", "projections"}`` in FLOPs.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    a = config.get("audio_num_attention_heads", config["num_attention_heads"]) * config.get("audio_attention_head_dim", 64)
    dc = config.get("cross_attention_dim", d)
    ac = config.get("audio_cross_attention_dim", a)
    layers = config["num_layers"]
    s, sa, t = tokens, audio_tokens, text_tokens
    self_proj = 4 * 2 * s * d * d + 4 * 2 * sa * a * a
    self_attn = 2 * 2 * s * s * d + 2 * 2 * sa * sa * a
    text = (2 * 2 * s * d * d + 2 * 2 * t * dc * d + 2 * 2 * s * t * d
            + 2 * 2 * sa * a * a + 2 * 2 * t * ac * a + 2 * 2 * sa * t * a)
    a2v = 2 * s * d * a + 2 * 2 * sa * a * a + 2 * s * a * d + 2 * 2 * s * sa * a
    v2a = 2 * sa * a * a + 2 * 2 * s * d * a + 2 * sa * a * a + 2 * 2 * sa * s * a
    feed = 2 * 2 * s * d * FFN_MULT * d + 2 * 2 * sa * a * FFN_MULT * a
    io = 2 * s * d * (config["in_channels"] + config.get("out_channels", config["in_channels"]))
    io += 2 * sa * a * (config.get("audio_in_channels", 128) + config.get("audio_out_channels", 128))
    return {
        "total": layers * (self_proj + self_attn + text + a2v + v2a + feed) + io,
        "self_attention": layers * self_attn,
        "cross_attention": layers * (text + a2v + v2a),
        "ffn": layers * feed,
        "projections": layers * self_proj + io,
    }


def video_tokens(config: dict, *, height: int, width: int, frames: int, vae_spatial: int = 32,
                 vae_temporal: int = 8) -> int:
    """Video tokens of a ``height x width x frames`` video after the VAE and the patch."""
    p, pt = config.get("patch_size", 1), config.get("patch_size_t", 1)
    latent_frames = (frames - 1) // vae_temporal + 1
    return (latent_frames // pt) * (height // vae_spatial // p) * (width // vae_spatial // p)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _adaln(width: int, mods: int) -> int:
    """An adaLN-single: the 256-channel timestep embedding to ``width``, then ``mods`` modulations."""
    return _linear(256, width) + _linear(width, width) + _linear(width, mods * width)


def parameter_counts(config: dict) -> dict[str, int]:
    """Parameters of one ``LTX2VideoTransformer3DModel`` block and of the whole transformer,
    from its config (equal to the module's own count: ``tests/test_ltx2.py``)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    a = config.get("audio_num_attention_heads", config["num_attention_heads"]) * config.get("audio_attention_head_dim", 64)
    dc, ac = config.get("cross_attention_dim", d), config.get("audio_cross_attention_dim", a)
    cap = config.get("caption_channels", 3840)
    c_in, a_in = config["in_channels"], config.get("audio_in_channels", 128)
    c_out = config.get("out_channels") or c_in
    a_out = config.get("audio_out_channels") or a_in
    norms = 2  # the q and k RMS norms across heads, one weight per channel each
    block = (
        4 * _linear(d, d) + norms * d                                                   # video self-attention
        + 2 * _linear(d, d) + 2 * _linear(dc, d) + norms * d                            # video text attention
        + 4 * _linear(a, a) + norms * a                                                 # audio self-attention
        + 2 * _linear(a, a) + 2 * _linear(ac, a) + norms * a                            # audio text attention
        + _linear(d, a) + 2 * _linear(a, a) + _linear(a, d) + norms * a                 # audio-to-video
        + _linear(a, a) + 2 * _linear(d, a) + _linear(a, a) + norms * a                 # video-to-audio
        + _linear(d, FFN_MULT * d) + _linear(FFN_MULT * d, d)                           # video feed-forward
        + _linear(a, FFN_MULT * a) + _linear(FFN_MULT * a, a)                           # audio feed-forward
        + 6 * d + 6 * a + 5 * d + 5 * a                                                 # modulation tables
    )
    rest = (_linear(c_in, d) + _linear(a_in, a) + _linear(cap, d) + _linear(d, d) + _linear(cap, a) + _linear(a, a)
            + _adaln(d, 6) + _adaln(a, 6) + _adaln(d, 4) + _adaln(a, 4) + _adaln(d, 1) + _adaln(a, 1)
            + _linear(d, c_out) + _linear(a, a_out) + 2 * d + 2 * a)
    return {"block": block, "expert": int(config["num_layers"]) * block + rest}
