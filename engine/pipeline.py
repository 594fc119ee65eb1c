"""The engine: request -> conditioning + noise -> denoise (per-expert) -> VAE decode -> frames.

Stages are separate methods so that executors can place them on different workers:
:meth:`Engine.prepare` (text encode, image encode, initial noise) produces a
:class:`~engine.state.DenoiseState`; :meth:`Engine.start` turns any state into a
:class:`~engine.denoise.DenoiseRun`; :meth:`Engine.decode` turns finished latents into frames.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from relay.engine.denoise import DenoiseRun, StepEvent, expert_schedule
from relay.engine.loader import DeviceExperts, LoadedModel, build_scheduler
from relay.engine.request import GenerationRequest, ResolvedRequest, open_image, resolve_request
from relay.engine.state import Conditioning, DenoiseState, capture_solver
from relay.engine.text import encode_prompt


class Engine:
    """Runs Wan 2.2 generations on one device with a :class:`~engine.loader.LoadedModel`."""

    def __init__(self, model: LoadedModel) -> None:
        from diffusers.video_processor import VideoProcessor

        self.model = model
        self.info = model.info
        self.device = model.device
        self.video_processor = VideoProcessor(vae_scale_factor=self.info.vae_spatial)

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Validates ``request`` (prompt length included) and fills its defaults."""
        return resolve_request(request, self.info, tokenizer=self.model.tokenizer)

    @torch.no_grad()
    def prepare(self, request: ResolvedRequest) -> DenoiseState:
        """Encodes the conditioning and draws the initial noise: the state before step 0."""
        info, device = self.info, self.device
        scheduler = build_scheduler(info, request.shift)
        scheduler.set_timesteps(request.steps, device=device)
        scheduler.set_begin_index(0)
        timesteps = [int(t) for t in scheduler.timesteps.cpu().tolist()]
        experts = expert_schedule(timesteps, request.boundary, info.num_train_timesteps)
        needs_uncond = request.guidance > 1.0 or (request.guidance_low or 0.0) > 1.0
        dtype = self.model.dtype
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
        state = DenoiseState(
            request=request.to_dict(), step_index=0, timesteps=timesteps, experts=experts,
            latents=latents, solver=capture_solver(scheduler), rng_state=generator.get_state(),
            conditioning=cond,
        )
        return state

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
        encoded = vae.encode(video.to(vae.dtype)).latent_dist.mode().to(device, torch.float32)
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

    def _latents_mean(self) -> torch.Tensor:
        conf = self.model.vae.config
        return torch.tensor(conf.latents_mean, device=self.device).view(1, conf.z_dim, 1, 1, 1)

    def _latents_inv_std(self) -> torch.Tensor:
        conf = self.model.vae.config
        return 1.0 / torch.tensor(conf.latents_std, device=self.device).view(1, conf.z_dim, 1, 1, 1)

    def start(self, state: DenoiseState, *, predict: Callable | None = None) -> DenoiseRun:
        """A :class:`DenoiseRun` that continues ``state`` on this engine's experts."""
        return DenoiseRun(
            state, experts=DeviceExperts(self.model),
            scheduler=build_scheduler(self.info, float(state.request["shift"])), device=self.device,
            expand_timesteps=self.info.expand_timesteps, patch_size=self.info.patch_size, predict=predict,
        )

    @torch.no_grad()
    def decode(self, state: DenoiseState | DenoiseRun) -> np.ndarray:
        """VAE-decodes finished latents to float32 frames ``(F, H, W, 3)`` in ``[0, 1]``."""
        latents = state.latents
        cond = state.cond if isinstance(state, DenoiseRun) else state.conditioning
        vae = self.model.vae
        latents = latents.to(self.device, torch.float32)
        if cond.first_frame is not None:
            mask = cond.first_frame_mask.to(self.device)
            latents = (1 - mask) * cond.first_frame.to(self.device) + mask * latents
        latents = latents.to(vae.dtype)
        latents = latents / self._latents_inv_std().to(vae.dtype) + self._latents_mean().to(vae.dtype)
        video = vae.decode(latents, return_dict=False)[0]
        frames = self.video_processor.postprocess_video(video, output_type="np")[0]
        return np.asarray(frames, dtype=np.float32)

    def generate(self, request: GenerationRequest | ResolvedRequest, *,
                 callback: Callable[[StepEvent], object] | None = None) -> np.ndarray:
        """Validates, prepares, denoises and decodes one request; returns its frames."""
        resolved = request if isinstance(request, ResolvedRequest) else self.resolve(request)
        run = self.start(self.prepare(resolved))
        run.run(callback=callback)
        return self.decode(run)
