"""Sequence parallelism for Wan transformers, installed as removable hooks and processors.

After patch embedding a video is a sequence of ``S`` tokens. Each rank of the sequence-parallel
group keeps one contiguous chunk of ``ceil(S / P)`` tokens (the sequence is padded at the end
when ``P`` does not divide ``S``):

* the model's forward pre-hook measures ``S`` and splits per-token timesteps (TI2V);
* a forward hook on ``rope`` slices the rotary tables to the rank's chunk;
* a pre-hook on ``blocks[0]`` splits the hidden states;
* every block's self-attention gets :class:`USPAttnProcessor`, which runs xfuser's
  long-context (Ulysses + ring) attention; cross-attention to the text stays local;
* a forward hook on ``proj_out`` all-gathers the chunks and drops the padding before
  unpatchify.

Padding is exact: padded keys are marked (NaN) inside the key tensor and dropped by the
attention kernel, and padded queries are discarded at the gather. Nothing in the model's code
is edited; :meth:`SequenceParallel.remove` restores it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _Chunk:
    """This rank's share of the current forward's token sequence."""

    seq: int = 0
    padded: int = 0
    size: int = 0
    start: int = 0

    @property
    def valid(self) -> int:
        """Real (unpadded) tokens in this rank's chunk."""
        return max(0, min(self.size, self.seq - self.start))


def _split(tensor: torch.Tensor, dim: int, chunk: _Chunk) -> torch.Tensor:
    """This rank's chunk of ``tensor`` along ``dim``, zero-padded past the real tokens."""
    pad = chunk.padded - tensor.shape[dim]
    if pad:
        shape = list(tensor.shape)
        shape[dim] = pad
        tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    return tensor.narrow(dim, chunk.start, chunk.size).contiguous()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (same arithmetic as diffusers' Wan processor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class USPAttnProcessor:
    """Self-attention of a Wan block through xfuser's Ulysses + ring attention.

    Projections, QK-norm (RMS over all heads, per token) and rotary embedding are per token
    and run on the local chunk; only the attention itself spans the group.
    """

    def __init__(self, owner: SequenceParallel) -> None:
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("USPAttnProcessor serves self-attention only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        chunk = self.owner.chunk
        padded = chunk.padded != chunk.seq
        if padded and chunk.valid < chunk.size:
            key = key.clone()
            key[:, chunk.valid:] = float("nan")  # the mark the padding-aware kernel drops
            value = value.clone()
            value[:, chunk.valid:] = 0
        out = self.owner.attention(padded)(None, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class SequenceParallel:
    """Splits a Wan transformer's tokens over ``group`` (installed on construction).

    Args:
        model: A ``WanTransformer3DModel`` (plain or FSDP-sharded).
        group: The sequence-parallel process group.
        rank: This rank's index in ``group`` (the chunk it owns).
        device: Device attention runs on (selects the attention kernel).
    """

    def __init__(self, model, *, group, rank: int, device: torch.device) -> None:
        self.model = model
        self.group = group
        self.rank = rank
        self.degree = dist.get_world_size(group)
        self.device = device
        self.chunk = _Chunk()
        self._attention = {}
        self._handles = [
            model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            model.rope.register_forward_hook(self._on_rope),
            model.blocks[0].register_forward_pre_hook(self._on_first_block),
            model.proj_out.register_forward_hook(self._on_proj_out),
        ]
        self._processors = []
        for block in model.blocks:
            self._processors.append((block.attn1, block.attn1.get_processor()))
            block.attn1.set_processor(USPAttnProcessor(self))

    def attention(self, padded: bool):
        """xfuser's long-context attention for this device (one per padding mode, cached)."""
        if padded not in self._attention:
            from relay.parallel.xdit import make_attention

            self._attention[padded] = make_attention(self.device, padded=padded)
        return self._attention[padded]

    def _on_model(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        pt, ph, pw = module.config.patch_size
        seq = (frames // pt) * (height // ph) * (width // pw)
        size = -(-seq // self.degree)
        self.chunk = _Chunk(seq=seq, padded=size * self.degree, size=size, start=self.rank * size)
        timestep = kwargs.get("timestep")
        if timestep is not None and timestep.ndim == 2:  # per-token timesteps (TI2V)
            kwargs = dict(kwargs, timestep=_split(timestep, 1, self.chunk))
        return args, kwargs

    def _on_rope(self, module, args, output):
        cos, sin = output
        return _split(cos, 1, self.chunk), _split(sin, 1, self.chunk)

    def _on_first_block(self, module, args):
        return (_split(args[0], 1, self.chunk), *args[1:])

    def _on_proj_out(self, module, args, output):
        from relay.parallel.groups import all_gather_stacked

        chunks = all_gather_stacked(output, self.group)  # (degree, batch, size, ...)
        gathered = chunks.transpose(0, 1).reshape(output.shape[0], self.chunk.padded, *output.shape[2:])
        return gathered[:, : self.chunk.seq]

    def remove(self) -> None:
        """Removes every hook and restores the original attention processors."""
        for handle in self._handles:
            handle.remove()
        for attn, processor in self._processors:
            attn.set_processor(processor)
        self._handles, self._processors = [], []
