"""Wan self-attention with a pluggable attention kernel, for sequence parallelism.

Projections, QK-norm (RMS over all heads, per token) and the rotary embedding are per token, so
they run on whatever chunk of the sequence a rank holds; only the attention itself spans the
sequence. :class:`KernelAttnProcessor` computes the per-token parts exactly as diffusers' Wan
processor does and hands ``(query, key, value)`` to the kernel it was given (the
sequence-parallel group's Ulysses / ring attention, :mod:`parallel.sequence`). No
``torch.distributed`` here: the kernel is what talks to the group.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (same arithmetic as diffusers' Wan processor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class KernelAttnProcessor:
    """A Wan block's self-attention computed with ``kernel(query, key, value)``.

    Args:
        kernel: Takes ``(batch, tokens, heads, head_dim)`` query, key and value and returns the
            attention output in the same layout.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("KernelAttnProcessor serves self-attention only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)
            key = apply_rotary(key, *rotary_emb)
        out = self.kernel(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def self_attention_modules(model) -> list:
    """The attention modules whose attention spans the video's tokens (``blocks.N.attn1``);
    cross-attention to the text (``attn2``) stays local."""
    return [block.attn1 for block in model.blocks]


def sequence_parallel_plan():
    """Wan's :class:`~engine.models.spec.SequenceParallelPlan`: diffusers' ``_cp_plan`` of
    ``WanTransformer3DModel`` (split after ``rope`` and before ``blocks.0``, per-token timesteps
    at the model's input, gather after ``proj_out``) and the self-attention processor."""
    from diffusers import WanTransformer3DModel

    from relay.engine.models.spec import SequenceParallelPlan

    return SequenceParallelPlan(cp_plan=WanTransformer3DModel._cp_plan,
                                self_attention=self_attention_modules, processor=KernelAttnProcessor)
