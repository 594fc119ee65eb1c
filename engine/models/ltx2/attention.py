"""LTX-2's attention for sequence parallelism: which tokens are split, and the two processors.

Only the video stream's tokens are split over the sequence-parallel ranks. The audio stream
stays whole on every rank: it has 25 tokens per second of video (126 for 5 s) against the
video's thousands (6,144 for the same 5 s at 768x512, about 1,200 per second), so its attention
is well under 1% of a forward and splitting it would only add collectives. Per block, with the video split:

* video self-attention (``attn1``) spans the group: :class:`KernelAttnProcessor` computes the
  projections, the QK RMS norm (per token) and the rotary embedding on this rank's tokens and
  hands ``(query, key, value)`` to the group's Ulysses / ring kernel; STG's perturbed blocks
  skip attention (the value passes through), the same on every rank;
* video-to-audio attention (``video_to_audio_attn``: audio queries, video keys) needs every video
  token: :class:`GatheredKeysAttnProcessor` computes this rank's keys and values and all-gathers
  them, so every rank computes the same audio update;
* the text cross-attention of both streams, the audio self-attention and the audio-to-video
  attention (video queries, audio keys) stay local.

The split points (the transformer's inputs ``hidden_states``, the per-token ``timestep`` of
image-to-video, the positions ``video_coords``; the gather after ``proj_out``) replace
diffusers' ``_cp_plan`` of the model, which also splits the text and has no place for the audio.
"""

from __future__ import annotations

import torch


def _project(attn, hidden_states, source, query_rotary_emb, key_rotary_emb):
    """Query, key and value as diffusers' LTX-2 processor builds them, ``(B, T, heads, dim)``."""
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

    query = attn.norm_q(attn.to_q(hidden_states))
    key = attn.norm_k(attn.to_k(source))
    value = attn.to_v(source)
    if query_rotary_emb is not None:
        rotate = apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else apply_split_rotary_emb
        query = rotate(query, query_rotary_emb)
        key = rotate(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
    return (query.unflatten(2, (attn.heads, -1)), key.unflatten(2, (attn.heads, -1)),
            value.unflatten(2, (attn.heads, -1)))


def _finish(attn, hidden_states, gate_logits):
    if gate_logits is not None:
        hidden_states = hidden_states.unflatten(2, (attn.heads, -1)) * (2.0 * torch.sigmoid(gate_logits)).unsqueeze(-1)
        hidden_states = hidden_states.flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](hidden_states))


class KernelAttnProcessor:
    """An LTX-2 block's video self-attention computed with ``kernel(query, key, value)`` (the
    group's Ulysses / ring attention), with STG's perturbation as diffusers' processor has it.

    Args:
        kernel: Takes ``(batch, local tokens, heads, head_dim)`` query, key and value and returns
            the attention output in the same layout.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 query_rotary_emb=None, key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("KernelAttnProcessor serves the unmasked video self-attention only")
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        if all_perturbed is None:
            all_perturbed = bool(torch.all(perturbation_mask == 0)) if perturbation_mask is not None else False
        if all_perturbed:  # STG: the value passes through (no attention, on every rank alike)
            return _finish(attn, attn.to_v(hidden_states), gate_logits)
        query, key, value = _project(attn, hidden_states, hidden_states, query_rotary_emb, key_rotary_emb)
        out = self.kernel(query, key, value).flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            out = torch.lerp(value.flatten(2, 3), out, perturbation_mask)
        return _finish(attn, out, gate_logits)


class GatheredKeysAttnProcessor:
    """LTX-2's video-to-audio attention with the video split: this rank's video keys and values,
    all-gathered by ``gather(key, value)``, attended by the whole audio stream's queries.

    Args:
        gather: ``(key, value)`` of this rank's tokens -> both over the whole sequence.
    """

    def __init__(self, gather) -> None:
        self.gather = gather

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 query_rotary_emb=None, key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None or attention_mask is not None or perturbation_mask is not None:
            raise RuntimeError("GatheredKeysAttnProcessor serves the unmasked video-to-audio attention only")
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query, key, value = _project(attn, hidden_states, encoder_hidden_states, query_rotary_emb, key_rotary_emb)
        key, value = self.gather(key, value)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        return _finish(attn, out.flatten(2, 3).to(query.dtype), gate_logits)


def self_attention_modules(model) -> list:
    """The video self-attention of every block (``transformer_blocks.N.attn1``)."""
    return [block.attn1 for block in model.transformer_blocks]


def gathered_key_modules(model) -> list:
    """The video-to-audio attention of every block (audio queries over the split video tokens)."""
    return [block.video_to_audio_attn for block in model.transformer_blocks]


def sequence_parallel_plan():
    """LTX-2's :class:`~engine.models.spec.SequenceParallelPlan` (see the module docstring)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from relay.engine.models.spec import SequenceParallelPlan

    cp_plan = {
        "": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "timestep": ContextParallelInput(split_dim=1, expected_dims=2, split_output=False),
            "video_coords": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    return SequenceParallelPlan(cp_plan=cp_plan, self_attention=self_attention_modules,
                                processor=KernelAttnProcessor, gathered_keys=gathered_key_modules,
                                gather_processor=GatheredKeysAttnProcessor)
