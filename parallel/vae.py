"""The Wan VAE split over a worker group's ranks by rows, exact.

Decode (and the image encode of I2V / TI2V) is a stack of per-pixel layers (RMS norm over
channels, 1x1 convolutions, SiLU, nearest upsampling, pixel (un)shuffles), 3x3 convolutions
(causal in time, so the time axis stays whole on every rank) and, in the mid-blocks, one
attention over all positions of a frame. So each rank takes a band of latent rows (pixel rows
``x spatial stride``) and:

* every convolution that pads in height gets real rows from its neighbours instead of zeros
  (a halo exchange of ``padding`` rows per side; zeros stay at the top and bottom of the
  frame), so each band's output equals the same rows of the single-rank result;
* the mid-block attention computes its band's queries against the keys and values gathered
  from every band (the only global operation);
* the bands are gathered on the group's output rank at the end.

Nothing in diffusers' VAE is edited: :class:`RowSplitVAE` overrides the ``forward`` of those
modules on the instance for the duration of one call and restores them after. The halo is
one row per 3x3 convolution and exact for any band height of at least one latent row; a frame
with fewer latent rows than ranks is decoded by the output rank alone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from relay.parallel.groups import all_gather_stacked


def band_rows(rows: int, ranks: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of each rank's latent rows: as equal as possible, earlier ranks first."""
    base, extra = divmod(rows, ranks)
    out, start = [], 0
    for rank in range(ranks):
        end = start + base + (1 if rank < extra else 0)
        out.append((start, end))
        start = end
    return out


class RowSplitVAE:
    """Runs a Wan VAE's decode / encode split by rows over ``group``.

    Args:
        vae: diffusers' ``AutoencoderKLWan`` (the same module on every rank).
        group: The process group (every rank calls :meth:`decode` / :meth:`encode` together).
        output_rank: The group rank that receives the gathered result.
    """

    def __init__(self, vae, group, *, output_rank: int = 0) -> None:
        self.vae = vae
        self.group = group
        self.rank = dist.get_rank(group)
        self.ranks = dist.get_world_size(group)
        self.output_rank = output_rank
        self._bands: list[tuple[int, int]] = []
        self._scale = 1  # rows of the current layer per latent row

    # --- entry points -------------------------------------------------------------------------
    def split_ranks(self, latent_rows: int) -> int:
        """Ranks a frame of ``latent_rows`` rows is split over (1: too few rows to split)."""
        return self.ranks if latent_rows >= self.ranks else 1

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """``vae.decode(latents)`` (clamped video ``(B, 3, F, H, W)``) on the output rank; ``None`` elsewhere."""
        rows = latents.shape[-2]
        if self.split_ranks(rows) == 1:
            return self.vae.decode(latents, return_dict=False)[0] if self.rank == self.output_rank else None
        self._bands = band_rows(rows, self.ranks)
        start, end = self._bands[self.rank]
        with self._installed():
            band = self.vae.decode(latents[..., start:end, :].contiguous(), return_dict=False)[0]
        return self._gather(band, scale=band.shape[-2] // (end - start))

    @torch.no_grad()
    def encode_mode(self, video: torch.Tensor) -> torch.Tensor:
        """The posterior mode of ``vae.encode(video)`` on every rank (the whole latent)."""
        stride = self.vae.spatial_compression_ratio
        rows = video.shape[-2] // stride
        if self.split_ranks(rows) == 1:
            return self.vae.encode(video).latent_dist.mode()
        self._bands = band_rows(rows, self.ranks)
        start, end = self._bands[self.rank]
        with self._installed():
            band = self.vae.encode(video[..., start * stride:end * stride, :].contiguous()).latent_dist.mode()
        return self._gather(band, scale=1, everywhere=True)

    # --- gathering ----------------------------------------------------------------------------
    def _sizes(self, scale: int) -> list[int]:
        return [(end - start) * scale for start, end in self._bands]

    def _gather(self, band: torch.Tensor, *, scale: int, everywhere: bool = False) -> torch.Tensor | None:
        sizes = self._sizes(scale)
        padded = _pad_rows(band, max(sizes))
        if everywhere:
            stacked = all_gather_stacked(padded, self.group)
        else:
            stacked = torch.empty((self.ranks, *padded.shape), dtype=padded.dtype, device=padded.device) \
                if self.rank == self.output_rank else None
            dist.gather(padded, list(stacked.unbind(0)) if stacked is not None else None,
                        dst=dist.get_global_rank(self.group, self.output_rank), group=self.group)
            if stacked is None:
                return None
        return torch.cat([stacked[r].narrow(-2, 0, sizes[r]) for r in range(self.ranks)], dim=-2)

    def halo(self, x: torch.Tensor, top: int, bottom: int) -> torch.Tensor:
        """``x`` (rows at dim -2) with ``top`` rows of the previous band above and ``bottom`` of
        the next below (zeros at the frame's edges)."""
        need = max(top, bottom)
        if need == 0:
            return x
        if x.shape[-2] < need:
            raise RuntimeError(f"a band of {x.shape[-2]} rows cannot give a halo of {need}")
        edges = torch.stack([x[..., :need, :], x[..., -need:, :]])
        gathered = all_gather_stacked(edges, self.group)  # (ranks, 2, ..., need, W)
        parts = []
        if top:
            above = gathered[self.rank - 1, 1][..., need - top:, :] if self.rank > 0 else \
                x.new_zeros((*x.shape[:-2], top, x.shape[-1]))
            parts.append(above)
        parts.append(x)
        if bottom:
            below = gathered[self.rank + 1, 0][..., :bottom, :] if self.rank < self.ranks - 1 else \
                x.new_zeros((*x.shape[:-2], bottom, x.shape[-1]))
            parts.append(below)
        return torch.cat(parts, dim=-2)

    def gather_tokens(self, tokens: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
        """Every band's ``tokens`` (row-major, ``rows`` rows of this band) concatenated in frame
        order along ``dim``."""
        widths = tokens.shape[dim] // rows
        scale = rows // (self._bands[self.rank][1] - self._bands[self.rank][0])
        sizes = [size * widths for size in self._sizes(scale)]
        pad = max(sizes) - tokens.shape[dim]
        if pad:
            shape = list(tokens.shape)
            shape[dim] = pad
            tokens = torch.cat([tokens, tokens.new_zeros(shape)], dim=dim)
        stacked = all_gather_stacked(tokens, self.group)
        return torch.cat([stacked[r].narrow(dim, 0, sizes[r]) for r in range(self.ranks)], dim=dim)

    # --- the module overrides -----------------------------------------------------------------
    @contextmanager
    def _installed(self):
        from diffusers.models.autoencoders.autoencoder_kl_wan import (WanAttentionBlock, WanCausalConv3d,
                                                                      WanResample)

        patched = []
        for module in self.vae.modules():
            forward = None
            if isinstance(module, WanCausalConv3d) and module._padding[2] > 0:
                forward = _causal_conv(self, module)
            elif isinstance(module, WanAttentionBlock):
                forward = _attention(self, module)
            elif isinstance(module, WanResample) and isinstance(module.resample, torch.nn.Sequential):
                for layer in module.resample:
                    if isinstance(layer, torch.nn.Conv2d) and layer.padding[0] > 0:
                        layer.forward = _conv2d(self, layer)
                        patched.append(layer)
                    elif isinstance(layer, torch.nn.ZeroPad2d):
                        layer.forward = _zero_pad(self, layer)
                        patched.append(layer)
            if forward is not None:
                module.forward = forward
                patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[-2] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((*x.shape[:-2], rows - x.shape[-2], x.shape[-1]))], dim=-2)


def _causal_conv(split: RowSplitVAE, conv):
    """``WanCausalConv3d.forward`` with its height padding taken from the neighbouring bands."""

    def forward(x, cache_x=None):
        padding = list(conv._padding)
        if cache_x is not None and padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        x = split.halo(x, padding[2], padding[3])
        padding[2] = padding[3] = 0
        return torch.nn.Conv3d.forward(conv, F.pad(x, padding))

    return forward


def _conv2d(split: RowSplitVAE, conv):
    """A padded ``nn.Conv2d`` (the upsampling convolution) with halo rows instead of zero rows."""

    def forward(x):
        x = split.halo(x, conv.padding[0], conv.padding[0])
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)

    return forward


def _zero_pad(split: RowSplitVAE, pad):
    """``ZeroPad2d((left, right, top, bottom))`` before a strided convolution: the bottom rows
    come from the next band (zeros only below the frame)."""
    left, right, top, bottom = pad.padding

    def forward(x):
        return F.pad(split.halo(x, top, bottom), (left, right, 0, 0))

    return forward


def _attention(split: RowSplitVAE, block):
    """``WanAttentionBlock.forward``: this band's queries against every band's keys and values."""

    def forward(x):
        identity = x
        batch, channels, time, height, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * time, channels, height, width)
        x = block.norm(x)
        qkv = block.to_qkv(x).reshape(batch * time, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        k = split.gather_tokens(k, height, dim=2)
        v = split.gather_tokens(v, height, dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch * time, channels, height, width)
        x = block.proj(x).view(batch, time, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity

    return forward
