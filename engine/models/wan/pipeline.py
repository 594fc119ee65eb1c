"""The Wan 2.2 parts of a generation: conditioning and initial noise, the transformer's inputs
at each step, and the VAE decode -- the same arithmetic as diffusers' ``WanPipeline`` and
``WanImageToVideoPipeline`` (written independently; the parity tests compare the two).

* T2V-A14B: text only; the transformer sees the latents.
* I2V-A14B: the first frame is VAE-encoded and concatenated, with a mask, to the latents on the
  channel axis (16 noise + 4 mask + 16 image = 36 channels).
* TI2V-5B: one timestep per latent token (``expand_timesteps``); with an image, the first latent
  frame is the image's clean latents, blended in at every step, and its tokens get timestep 0.
"""

from __future__ import annotations

import numpy as np
import torch

from relay.engine.request import ResolvedRequest, open_image
from relay.engine.state import Conditioning
from relay.engine.models.wan.text import encode_prompt


class StepInputs:
    """The transformer's inputs at each step of one run (fixed parts computed once).

    Args:
        cond: The run's conditioning (on the run device).
        latents_shape: Shape of the latents.
        expand_timesteps: Per-token timesteps (TI2V).
        patch_size: Transformer patch size, for per-token timesteps.
        device: The run device.
    """

    def __init__(self, cond: Conditioning, latents_shape, *, expand_timesteps: bool,
                 patch_size: tuple[int, int, int], device: torch.device) -> None:
        self.cond = cond
        self.expand_timesteps = expand_timesteps
        if expand_timesteps:  # per-token timestep weights, fixed for the whole run
            mask = cond.first_frame_mask
            if mask is None:
                mask = torch.ones(latents_shape, dtype=torch.float32, device=device)
            _, ph, pw = patch_size
            self._token_mask = mask[0][0][:, ::ph, ::pw]

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the transformer denoises: the latents, blended with the first frame (TI2V
        image mode) or concatenated with the image condition (I2V)."""
        c = self.cond
        if c.first_frame is not None:
            return (1 - c.first_frame_mask) * c.first_frame + c.first_frame_mask * latents
        if c.concat is not None:
            return torch.cat([latents, c.concat], dim=1)
        return latents

    def timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The timestep tensor of step ``t``: one per sample, or one per token (TI2V)."""
        if not self.expand_timesteps:
            return t.expand(batch)
        per_token = (self._token_mask * t).flatten()
        return per_token.unsqueeze(0).expand(batch, -1)


class Pipeline:
    """The Wan parts of :class:`engine.pipeline.Engine` for one loaded model."""

    def __init__(self, model) -> None:
        from diffusers.video_processor import VideoProcessor

        self.model = model
        self.info = model.info
        self.device = model.device
        self.video_processor = VideoProcessor(vae_scale_factor=self.info.vae_spatial)
        #: The group's row split of the VAE (:class:`parallel.vae.RowSplitVAE`), set by a worker
        #: with ``--vae-parallel``; ``None``: one rank encodes and decodes whole frames.
        self.vae_split = None

    @torch.no_grad()
    def encode(self, request: ResolvedRequest, *, needs_uncond: bool) -> tuple[Conditioning, torch.Tensor, torch.Generator]:
        """Text (and image) conditioning and the initial noise.

        Returns:
            ``(conditioning, latents, generator)``; the generator (CPU, seeded with the
            request's seed) has drawn the noise and goes on into the solver.
        """
        info, device, dtype = self.info, self.device, self.model.dtype
        tokenizer, encoder = self.model.tokenizer, self.model.encoder_on_device()
        prompt_embeds = encode_prompt(tokenizer, encoder, request.prompt, device=device, dtype=dtype)
        negative = (encode_prompt(tokenizer, encoder, request.negative_prompt, device=device, dtype=dtype)
                    if needs_uncond else None)
        latent_frames = (request.frames - 1) // info.temporal_stride + 1
        channels = info.in_channels if info.expand_timesteps else info.z_dim
        shape = (1, channels, latent_frames, request.height // info.vae_spatial,
                 request.width // info.vae_spatial)
        # Noise is always drawn on the CPU: the same seed gives the same video on any device.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        cond = Conditioning(prompt_embeds=prompt_embeds, negative_embeds=negative)
        if request.image is not None:
            cond = self._image_conditioning(cond, request, latents.shape)
        return cond, latents, generator

    def _image_conditioning(self, cond: Conditioning, request: ResolvedRequest, shape) -> Conditioning:
        """I2V: VAE-encode the first frame (mode of the posterior) and build the mask."""
        info, vae, device = self.info, self.model.vae, self.device
        image = self.video_processor.preprocess(open_image(request.image), height=request.height,
                                                width=request.width).to(device, torch.float32)
        image = image.unsqueeze(2)
        _, _, latent_frames, lat_h, lat_w = shape
        if info.expand_timesteps:
            video = image
        else:
            pad = image.new_zeros(1, image.shape[1], request.frames - 1, request.height, request.width)
            video = torch.cat([image, pad], dim=2)
        video = video.to(vae.dtype)
        mode = self.vae_split.encode_mode(video) if self.vae_split is not None else vae.encode(video).latent_dist.mode()
        encoded = mode.to(device, torch.float32)
        encoded = (encoded - self._latents_mean()) * self._latents_inv_std()
        if info.expand_timesteps:
            mask = torch.ones(1, 1, latent_frames, lat_h, lat_w, dtype=torch.float32, device=device)
            mask[:, :, 0] = 0
            return Conditioning(prompt_embeds=cond.prompt_embeds, negative_embeds=cond.negative_embeds,
                                first_frame=encoded, first_frame_mask=mask)
        stride = info.temporal_stride
        mask = torch.zeros(1, 1, request.frames, lat_h, lat_w, device=device)
        mask[:, :, 0] = 1
        # The first pixel frame maps to a whole latent frame: repeat its mask over the stride.
        mask = torch.cat([mask[:, :, :1].repeat_interleave(stride, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, stride, lat_h, lat_w).transpose(1, 2)
        return Conditioning(prompt_embeds=cond.prompt_embeds, negative_embeds=cond.negative_embeds,
                            concat=torch.cat([mask, encoded], dim=1))

    def step_inputs(self, cond: Conditioning, latents_shape, device: torch.device) -> StepInputs:
        """The per-step input builder of a run (see :class:`StepInputs`)."""
        return StepInputs(cond, latents_shape, expand_timesteps=self.info.expand_timesteps,
                          patch_size=self.info.patch_size, device=device)

    def _latents_mean(self) -> torch.Tensor:
        conf = self.model.vae.config
        return torch.tensor(conf.latents_mean, device=self.device).view(1, conf.z_dim, 1, 1, 1)

    def _latents_inv_std(self) -> torch.Tensor:
        conf = self.model.vae.config
        return 1.0 / torch.tensor(conf.latents_std, device=self.device).view(1, conf.z_dim, 1, 1, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: Conditioning) -> np.ndarray | None:
        """VAE-decodes finished latents to float32 frames ``(F, H, W, 3)`` in ``[0, 1]`` (with a
        row split, every rank of the group calls this and the output rank gets the frames;
        the others get ``None``)."""
        vae = self.model.vae
        latents = latents.to(self.device, torch.float32)
        if cond.first_frame is not None:
            mask = cond.first_frame_mask.to(self.device)
            latents = (1 - mask) * cond.first_frame.to(self.device) + mask * latents
        latents = latents.to(vae.dtype)
        latents = latents / self._latents_inv_std().to(vae.dtype) + self._latents_mean().to(vae.dtype)
        video = self.vae_split.decode(latents) if self.vae_split is not None else vae.decode(latents, return_dict=False)[0]
        if video is None:
            return None
        frames = self.video_processor.postprocess_video(video, output_type="np")[0]
        return np.asarray(frames, dtype=np.float32)
