"""Cheap latent previews: a linear latent-to-RGB projection instead of a VAE decode.

A preview of the current latents is one small PNG per streamed progress event. Decoding with the
VAE would cost about as much as a denoise step, so each latent pixel is projected to a colour
instead: ``rgb = latent @ factors + bias`` (roughly in ``[-1, 1]``), shown as ``(rgb + 1) / 2``.
One latent frame covers the VAE's temporal stride in video frames (the first covers one) and one
latent pixel its spatial stride squared pixels (see :func:`vae_latent_layout`).

A model family may ship a published projection (the spec's ``preview_projection``): for the
Wan 2.1 VAE (16 channels; Wan 2.2 T2V-A14B and I2V-A14B) the published factors in
``engine/models/wan/wan21_latent_rgb.json``, used when a VAE's latents match them. Any other VAE
gets a projection fitted once, by least squares, to its own decode of random latents. Both act on the *normalised* latents that the
denoiser holds, ``(z - latents_mean) * scaling_factor / latents_std``.

The previewer reads one 5-D video latent grid ``(1, C, F, h, w)``. A family whose run latents are
laid out otherwise (LTX-2's flat video + audio tokens) defines ``preview_latents(latents, cond)``
on its pipeline, and :func:`video_latents` applies it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


#: How close a VAE's ``latents_mean``/``latents_std`` must be to the published ones.
STATS_TOLERANCE = 1e-3

#: Latents drawn for a fit: ``(batch, frames, height, width)``; 2 * 2 * 8 * 8 = 256 samples, over
#: five times the 49 unknowns of a 48-channel VAE, and one decode of well under a second on a CPU.
FIT_SHAPE = (2, 2, 8, 8)
FIT_SEED = 0

#: Least-squares samples per unknown a default fit draws at least: a VAE with more channels than
#: :data:`FIT_SHAPE` covers (LTX-2's 128) gets a larger latent grid (:func:`fit_shape`).
SAMPLES_PER_UNKNOWN = 5


def load_published(path: str | Path) -> dict:
    """Reads a published projection (e.g. the Wan 2.1 VAE's, the Wan spec's ``preview_projection``).

    Args:
        path: The JSON file.

    Returns:
        The JSON object: ``factors_rgb_per_channel`` (16 x 3), ``bias_rgb`` (3),
        ``vae_latents_mean`` and ``vae_latents_std`` (16 each), and more.
    """
    return json.loads(Path(path).read_text())


@dataclass(frozen=True)
class VaeLatents:
    """How a video VAE's latents are laid out and normalised (read by :func:`vae_latent_layout`).

    Attributes:
        channels: Latent channels.
        mean, std: ``(channels,)`` float32 tensors on the VAE's device, or ``None`` when the VAE
            has none (then the latents are not shifted / scaled per channel).
        scaling_factor: The global ``scaling_factor`` (1.0 when the VAE has none).
        temporal: Video frames per latent frame after the first (which covers one).
        spatial: Pixels per latent pixel along each side.
    """

    channels: int
    mean: torch.Tensor | None
    std: torch.Tensor | None
    scaling_factor: float
    temporal: int
    spatial: int


def _first(*values):
    """The first of ``values`` that is not ``None`` (``None`` if all are)."""
    return next((value for value in values if value is not None), None)


def vae_latent_layout(vae) -> VaeLatents:
    """Reads a diffusers video VAE's latent layout, from its config or its attributes.

    Works for ``AutoencoderKLWan`` (``config.z_dim``, ``config.latents_mean``/``latents_std``
    lists, ``config.scale_factor_temporal``/``scale_factor_spatial``) and for
    ``AutoencoderKLLTX2Video``-like VAEs (``config.latent_channels``, ``latents_mean``/
    ``latents_std`` buffers, ``config.scaling_factor``, ``temporal_compression_ratio``/
    ``spatial_compression_ratio`` attributes); a config entry wins over an attribute.

    Args:
        vae: The VAE (any device and dtype).

    Returns:
        Its :class:`VaeLatents`.

    Raises:
        ValueError: If the channels or either stride cannot be found.
    """
    config = vae.config
    channels = _first(getattr(config, "z_dim", None), getattr(config, "latent_channels", None))
    temporal = _first(getattr(config, "scale_factor_temporal", None), getattr(vae, "temporal_compression_ratio", None))
    spatial = _first(getattr(config, "scale_factor_spatial", None), getattr(vae, "spatial_compression_ratio", None))
    if channels is None or temporal is None or spatial is None:
        raise ValueError(f"{type(vae).__name__} does not say its latent channels and temporal/spatial strides")
    try:
        device = next(vae.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")

    def stats(key):
        value = getattr(config, key, None)  # the config first: a module attribute of the same name is deprecated
        if value is None:
            value = getattr(vae, key, None)  # a buffer (the LTX-2 VAE)
        return None if value is None else torch.as_tensor(value, dtype=torch.float32).to(device).reshape(-1)

    scaling = getattr(config, "scaling_factor", None)
    return VaeLatents(channels=int(channels), mean=stats("latents_mean"), std=stats("latents_std"),
                      scaling_factor=1.0 if scaling is None else float(scaling),
                      temporal=int(temporal), spatial=int(spatial))


def fit_shape(channels: int, base: tuple[int, ...] = FIT_SHAPE) -> tuple[int, ...]:
    """``base`` with its latent grid grown (height, then width, by one) until the fit has at
    least :data:`SAMPLES_PER_UNKNOWN` samples per unknown (``channels`` factors and a bias).

    :data:`FIT_SHAPE` is returned as it is for up to 50 channels (Wan's 16 and 48).
    """
    batch, frames, height, width = base
    while batch * frames * height * width < SAMPLES_PER_UNKNOWN * (channels + 1):
        if height <= width:
            height += 1
        else:
            width += 1
    return batch, frames, height, width


def video_latents(family, latents: torch.Tensor, cond=None) -> torch.Tensor:
    """The 5-D normalised video latents ``(1, C, F, h, w)`` of a run's ``latents``.

    The seam for families whose run latents are not that grid: ``family.preview_latents(latents,
    cond)`` when the family pipeline defines it (LTX-2: the video stream of the flat tokens),
    else ``latents`` themselves (Wan).

    Args:
        family: The engine's family pipeline (``Engine.family``).
        latents: The run's latents.
        cond: The run's :class:`~engine.state.Conditioning` (the layout a family may need).
    """
    convert = getattr(family, "preview_latents", None)
    return latents if convert is None else convert(latents, cond)


def _matches(vae, published: dict) -> bool:
    """Whether a VAE has the latent layout and statistics the published factors assume."""
    layout = vae_latent_layout(vae)
    if layout.channels != int(published["latent_channels"]) or layout.scaling_factor != 1.0:
        return False
    for ours, ref in ((layout.mean, "vae_latents_mean"), (layout.std, "vae_latents_std")):
        if ours is None or len(ours) != len(published[ref]):
            return False
        if not np.allclose(ours.cpu().numpy(), published[ref], rtol=0.0, atol=STATS_TOLERANCE):
            return False
    return True


def pool_to_latent_grid(video: torch.Tensor, latent_frames: int, temporal: int, spatial: int) -> torch.Tensor:
    """Averages a decoded video over the pixels that each latent cell covers.

    Args:
        video: ``(B, C, T, H, W)`` with ``T = 1 + temporal * (latent_frames - 1)``.
        latent_frames: Latent frames ``F`` the video was decoded from.
        temporal: Video frames per latent frame after the first (which covers one).
        spatial: Pixels per latent pixel along each side.

    Returns:
        ``(B, C, F, H // spatial, W // spatial)``.

    Raises:
        ValueError: If the video's shape does not fit that layout.
    """
    _, _, frames, height, width = video.shape
    if frames != 1 + temporal * (latent_frames - 1) or height % spatial or width % spatial:
        raise ValueError(f"decoded video {tuple(video.shape)} does not fit {latent_frames} latent "
                         f"frames at temporal stride {temporal} and spatial stride {spatial}")
    parts = [F.avg_pool3d(video[:, :, :1], (1, spatial, spatial))]
    if latent_frames > 1:
        parts.append(F.avg_pool3d(video[:, :, 1:], (temporal, spatial, spatial)))
    return torch.cat(parts, dim=2)


class LatentPreviewer:
    """Projects normalised video latents to RGB with a ``(z_dim, 3)`` factor matrix and a ``(3,)`` bias.

    Attributes:
        factors: ``(z_dim, 3)`` float32 CPU tensor.
        bias: ``(3,)`` float32 CPU tensor.
        source: ``"published"`` (the Wan 2.1 factors) or ``"fitted"`` (least squares on the VAE).
    """

    def __init__(self, factors, bias, *, source: str = "given") -> None:
        self.factors = torch.as_tensor(factors, dtype=torch.float32).detach().cpu().reshape(-1, 3)
        self.bias = torch.as_tensor(bias, dtype=torch.float32).detach().cpu().reshape(3)
        self.source = source

    @property
    def z_dim(self) -> int:
        """Latent channels this projection expects."""
        return self.factors.shape[0]

    @classmethod
    def published(cls, path: str | Path) -> LatentPreviewer:
        """A published projection (the Wan 2.1 VAE's has 16 channels)."""
        data = load_published(path)
        return cls(data["factors_rgb_per_channel"], data["bias_rgb"], source="published")

    @classmethod
    def for_vae(cls, vae, published: str | Path | None = None) -> LatentPreviewer:
        """The projection for ``vae``: published when its latents match, else fitted (keep it).

        Args:
            vae: A diffusers video VAE that :func:`vae_latent_layout` reads (``AutoencoderKLWan``,
                ``AutoencoderKLLTX2Video``; any device and dtype).
            published: The family's published projection (``None``: always fit).

        Returns:
            A previewer whose ``source`` says which branch was taken.
        """
        if published is not None and _matches(vae, load_published(published)):
            return cls.published(published)
        return cls.fit(vae)

    @classmethod
    @torch.no_grad()
    def fit(cls, vae, *, shape: tuple[int, ...] | None = None, seed: int = FIT_SEED) -> LatentPreviewer:
        """Fits ``rgb ~ latent @ W + b`` by least squares to ``vae``'s decode of random latents.

        Standard-normal latents (normalised, as the denoiser holds them) are un-normalised exactly
        as the pipelines do before decoding (``z * latents_std / scaling_factor + latents_mean``),
        decoded (a timestep-conditioned decoder gets timestep 0, as the LTX-2 pipeline's default),
        and the video is averaged over each latent cell; each latent pixel is then one sample.

        Args:
            vae: A diffusers video VAE that :func:`vae_latent_layout` reads (any device and dtype).
            shape: ``(batch, frames, height, width)`` of the random latents (default
                :func:`fit_shape` of the VAE's channels: :data:`FIT_SHAPE` for Wan). A decoder
                with reflect padding (LTX-2) needs ``height`` and ``width`` of at least 2.
            seed: Seed of the CPU generator that draws them.

        Returns:
            A previewer with ``source == "fitted"``.

        Raises:
            ValueError: If the decoded video does not fit the latent grid.
        """
        layout = vae_latent_layout(vae)
        z_dim = layout.channels
        batch, frames, height, width = fit_shape(z_dim) if shape is None else shape
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(batch, z_dim, frames, height, width, generator=generator)
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        mean = (layout.mean if layout.mean is not None else torch.zeros(z_dim, device=device)).view(1, z_dim, 1, 1, 1)
        std = layout.std if layout.std is not None else torch.ones(z_dim, device=device)
        inv_std = (layout.scaling_factor / std).view(1, z_dim, 1, 1, 1)
        raw = latents.to(device, dtype) / inv_std.to(dtype) + mean.to(dtype)
        if getattr(vae.config, "timestep_conditioning", False):
            video = vae.decode(raw, torch.zeros(batch, device=device, dtype=dtype), return_dict=False)[0]
        else:
            video = vae.decode(raw, return_dict=False)[0]
        video = video.float().cpu()
        target = pool_to_latent_grid(video, frames, layout.temporal, layout.spatial)
        if target.shape[-2:] != (height, width):
            raise ValueError(f"decoded {tuple(video.shape)} does not match latents {tuple(latents.shape)}")
        x = latents.permute(0, 2, 3, 4, 1).reshape(-1, z_dim).double()
        y = target.permute(0, 2, 3, 4, 1).reshape(-1, 3).double()
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
        return cls(solution[:-1], solution[-1], source="fitted")

    @torch.no_grad()
    def rgb(self, latents: torch.Tensor) -> np.ndarray:
        """Projects normalised latents to colours.

        Args:
            latents: ``(1, z_dim, F, h, w)`` as the denoise loop holds them (any device and dtype).

        Returns:
            uint8 array ``(F, h, w, 3)``.

        Raises:
            ValueError: If the latents are not ``(1, z_dim, F, h, w)``.
        """
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be (1, {self.z_dim}, F, h, w), got {tuple(latents.shape)}")
        x = latents[0].detach().to("cpu", torch.float32)
        colour = torch.einsum("cfhw,cr->fhwr", x, self.factors) + self.bias
        unit = ((colour + 1.0) / 2.0).clamp(0.0, 1.0)
        return (unit * 255.0 + 0.5).to(torch.uint8).numpy()

    def png(self, latents: torch.Tensor, *, max_side: int = 256) -> bytes:
        """The middle latent frame as a PNG, enlarged by nearest neighbour.

        Args:
            latents: ``(1, z_dim, F, h, w)`` normalised latents.
            max_side: Bound on the longer side; the integer scale is the largest that keeps within
                it, and at least 1 (so a grid larger than ``max_side`` is not shrunk).

        Returns:
            The encoded PNG.
        """
        from PIL import Image

        middle = latents.shape[2] // 2 if latents.dim() == 5 else 0  # rgb() reports a bad shape
        frame = self.rgb(latents[:, :, middle:middle + 1] if latents.dim() == 5 else latents)[0]
        scale = max(1, int(max_side) // max(frame.shape[:2]))
        frame = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame)).save(buffer, "PNG")
        return buffer.getvalue()
