"""The LTX-2 parts of a generation: Gemma 3 + connector conditioning, the joint video + audio
noise, LTX-2's four-forward guidance at each step, and the video VAE + audio VAE + vocoder
decode -- the same arithmetic as diffusers' ``LTX2Pipeline`` and ``LTX2ImageToVideoPipeline``
(written independently; the parity tests compare the two).

One latent tensor carries both streams: the packed video tokens ``(1, Sv, Cv)`` and the packed
audio tokens ``(1, Sa, Ca)``, each flattened and concatenated, ``(1, Sv*Cv + Sa*Ca)``. LTX-2
steps both streams with one flow-match Euler schedule (the pipeline keeps a copy of the
scheduler for the audio), and Euler is elementwise, so one scheduler stepping the concatenation
is the same arithmetic; a checkpoint, a hand-off and a resume carry both streams as one tensor.

Image-to-video: the first latent frame is the image's clean latents; its tokens get timestep 0
and a zero velocity, so the solver leaves them as they are (the pipeline steps only the other
frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from relay.engine.request import ResolvedRequest, open_image
from relay.engine.state import Conditioning


@dataclass(frozen=True)
class Layout:
    """Where each stream sits in the flat latents, and its packed shape.

    Attributes:
        frames, height, width: The video latent grid (after the VAE, before the patch).
        video_tokens, video_channels: Packed video ``(1, video_tokens, video_channels)``.
        audio_frames, mel_bins, audio_channels: The audio latent ``(1, audio_channels,
            audio_frames, mel_bins)``, packed as ``(1, audio_frames, audio_channels * mel_bins)``.
    """

    frames: int
    height: int
    width: int
    video_tokens: int
    video_channels: int
    audio_frames: int
    mel_bins: int
    audio_channels: int

    @property
    def video_size(self) -> int:
        return self.video_tokens * self.video_channels

    def split(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(video (1, Sv, Cv), audio (1, Sa, Ca*M))`` views of the flat ``latents``."""
        video = latents[:, :self.video_size].reshape(1, self.video_tokens, self.video_channels)
        audio = latents[:, self.video_size:].reshape(1, self.audio_frames, self.audio_channels * self.mel_bins)
        return video, audio

    @staticmethod
    def join(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """The flat latents of the two packed streams."""
        return torch.cat([video.reshape(video.shape[0], -1), audio.reshape(audio.shape[0], -1)], dim=1)

    def to_dict(self) -> dict:
        return dict(vars(self))


def pack_video(latents: torch.Tensor, patch: int, patch_t: int) -> torch.Tensor:
    """``(B, C, F, H, W)`` to tokens ``(B, F/pt * H/p * W/p, C*pt*p*p)`` (frame-major, as LTX-2)."""
    b, c, f, h, w = latents.shape
    x = latents.reshape(b, c, f // patch_t, patch_t, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_video(tokens: torch.Tensor, frames: int, height: int, width: int, patch: int, patch_t: int) -> torch.Tensor:
    """Inverse of :func:`pack_video` (``frames``, ``height``, ``width``: the patch grid)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, frames, height, width, -1, patch_t, patch, patch)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def rescale(guided: torch.Tensor, reference: torch.Tensor, amount: float) -> torch.Tensor:
    """Pulls ``guided`` towards ``reference``'s standard deviation by ``amount`` (guidance
    rescale, Lin et al. 2023, as the pipeline applies it to x0)."""
    dims = list(range(1, reference.ndim))
    ratio = reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return amount * (guided * ratio) + (1 - amount) * guided


class Pipeline:
    """The LTX-2 parts of :class:`engine.pipeline.Engine` for one loaded model."""

    def __init__(self, model) -> None:
        from diffusers.video_processor import VideoProcessor

        self.model = model
        self.info = model.info
        self.device = model.device
        self.video_processor = VideoProcessor(vae_scale_factor=self.info.vae_spatial)
        #: Whether STG changes anything: the transformer's self-attention takes the perturbation.
        self.perturbs = bool(self.info.transformer_config.get("perturbed_attn", False))
        # The image-to-video pipeline resizes its image bilinearly (the processor's default is lanczos).
        self.image_processor = VideoProcessor(vae_scale_factor=self.info.vae_spatial, resample="bilinear")
        #: Set by a worker with ``--vae-parallel``; LTX-2 decodes whole frames (it stays ``None``).
        self.vae_split = None

    # --- schedule -------------------------------------------------------------------------------
    def set_schedule(self, scheduler, request: ResolvedRequest) -> None:
        """LTX-2's sigma schedule for ``request`` (:func:`engine.models.ltx2.loading.set_schedule`)."""
        from relay.engine.models.ltx2.loading import set_schedule

        set_schedule(scheduler, request.steps, request.shift, device=self.device)

    # --- conditioning and noise -----------------------------------------------------------------
    def _audio_frames(self, request: ResolvedRequest) -> int:
        conf = self.model.components["audio_vae"].config if "audio_vae" in self.model.components else None
        rate = conf.sample_rate if conf is not None else 16000
        hop = conf.mel_hop_length if conf is not None else 160
        per_second = rate / hop / 4.0  # the audio VAE's 4x temporal compression
        return round(request.frames / float(request.fps) * per_second)

    def layout(self, request: ResolvedRequest) -> Layout:
        """The latent layout of ``request``."""
        info = self.info
        patch_t, patch, _ = info.patch_size
        frames = (request.frames - 1) // (info.temporal_stride // patch_t) + 1
        height, width = request.height // info.vae_spatial, request.width // info.vae_spatial
        tconf = info.transformer_config
        audio_vae = self.model.components.get("audio_vae")
        mel = (audio_vae.config.mel_bins if audio_vae is not None else 64) // 4
        audio_channels = audio_vae.config.latent_channels if audio_vae is not None else 8
        return Layout(frames=frames // patch_t, height=height // patch, width=width // patch,
                      video_tokens=(frames // patch_t) * (height // patch) * (width // patch),
                      video_channels=int(tconf.get("in_channels", 128)), audio_frames=self._audio_frames(request),
                      mel_bins=mel, audio_channels=audio_channels)

    @torch.no_grad()
    def encode(self, request: ResolvedRequest, *, needs_uncond: bool) -> tuple[Conditioning, torch.Tensor, torch.Generator]:
        """Text (and image) conditioning and the initial noise of both streams.

        ``needs_uncond`` is decided here from LTX-2's own scales (the audio stream's guidance
        runs the unconditional forward too).

        Returns:
            ``(conditioning, flat latents, generator)``; the generator (CPU, seeded with the
            request's seed) drew the video noise, then the audio noise.
        """
        from relay.engine.models.ltx2.text import encode_prompt

        terms = request.guidance_terms
        needs_uncond = request.guidance > 1.0 or terms["audio"] > 1.0
        model, device = self.model, self.device
        encoder, connectors = model.encoder_on_device(), model.components["connectors"]
        video, audio, mask = encode_prompt(model.tokenizer, encoder, connectors, request.prompt, device=device)
        extra = {"audio_embeds": audio, "mask": mask}
        negative = None
        if needs_uncond:
            negative, extra["negative_audio_embeds"], extra["negative_mask"] = encode_prompt(
                model.tokenizer, encoder, connectors, request.negative_prompt, device=device)
        layout = self.layout(request)
        patch_t, patch, _ = self.info.patch_size
        latent_frames = (request.frames - 1) // (self.info.temporal_stride // patch_t) + 1
        shape = (1, self.info.z_dim, latent_frames, request.height // self.info.vae_spatial,
                 request.width // self.info.vae_spatial)
        image = self._image_latents(request, latent_frames) if request.image is not None else None
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        if image is not None:
            frame_mask = torch.zeros((1, 1, *shape[2:]), dtype=torch.float32, device=device)
            frame_mask[:, :, 0] = 1.0
            noise = image * frame_mask + noise * (1 - frame_mask)
            extra["conditioning_mask"] = pack_video(frame_mask, patch, patch_t).squeeze(-1)
        video_latents = pack_video(noise, patch, patch_t)
        audio_shape = (1, layout.audio_channels, layout.audio_frames, layout.mel_bins)
        audio_noise = torch.randn(audio_shape, generator=generator, dtype=torch.float32).to(device)
        audio_latents = audio_noise.transpose(1, 2).flatten(2, 3)
        extra["layout"] = layout.to_dict()
        cond = Conditioning(prompt_embeds=video, negative_embeds=negative, extra=extra)
        return cond, Layout.join(video_latents, audio_latents), generator

    def _image_latents(self, request: ResolvedRequest, latent_frames: int) -> torch.Tensor:
        """I2V: the image re-compressed as LTX-2 was trained (H.264 at the text encoder
        generation's CRF), VAE-encoded (posterior mode), normalised, repeated over the frames."""
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf
        from PIL import Image

        from relay.engine.video import _filled_allocations

        vae = self.model.vae
        image = open_image(request.image)
        crf = resolve_default_image_crf(self.model.text_encoder)
        if crf:
            with _filled_allocations():  # x264 reads memory it never wrote (see engine.video)
                image = Image.fromarray(apply_image_conditioning_crf(np.array(image.convert("RGB")), crf))
        pixels = self.image_processor.preprocess(image, height=request.height, width=request.width)
        pixels = pixels.to(self.device, vae.dtype).unsqueeze(2)
        encoded = vae.encode(pixels).latent_dist.mode().to(torch.float32)
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(encoded)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(encoded)
        return ((encoded - mean) / std).repeat(1, 1, latent_frames, 1, 1)

    def step_inputs(self, cond: Conditioning, latents_shape, device: torch.device) -> StepInputs:
        """The per-step input builder of a run (see :class:`StepInputs`)."""
        return StepInputs(cond, device)

    # --- guidance ---------------------------------------------------------------------------------
    def predict(self, model, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, guidance: float, *,
                branch, step) -> tuple[torch.Tensor, int]:
        """LTX-2's guided velocity of both streams (see :mod:`engine.models.ltx2.rules` for the
        terms), as flat latents; ``(velocity, forwards run)``."""
        terms = step.request["guidance_terms"]
        layout = Layout(**cond.extra["layout"])
        latents = step.latents
        video, audio = layout.split(latents)
        sigma = step.scheduler.sigmas[step.index]
        t = step.scheduler.timesteps[step.index].expand(1)
        coords = rotary_coords(model, layout, float(step.request["fps"]), latents.device)
        dtype = model.dtype
        audio_scale = terms["audio"]
        cfg = guidance > 1.0 or audio_scale > 1.0
        # A transformer without perturbable self-attention (``perturbed_attn`` false: the published
        # LTX-2.0 config) runs the STG forward exactly as the conditional one, so its delta is
        # zero: that forward is skipped (a quarter of a default step).
        stg = (terms["stg"] > 0.0 or terms["audio_stg"] > 0.0) and self.perturbs
        modality = terms["modality"] > 1.0 or terms["audio_modality"] > 1.0
        image_mask = cond.extra.get("conditioning_mask")
        video_t = t.unsqueeze(-1) * (1 - image_mask) if image_mask is not None else t

        def forward(name: str, embeds, audio_embeds, mask, *, blocks=None, isolate=False):
            def call():
                with branch(name):
                    return model(
                        hidden_states=video.to(dtype), audio_hidden_states=audio.to(dtype),
                        encoder_hidden_states=embeds, audio_encoder_hidden_states=audio_embeds,
                        timestep=video_t, audio_timestep=t if image_mask is not None else None, sigma=t,
                        encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                        num_frames=layout.frames, height=layout.height, width=layout.width,
                        fps=float(step.request["fps"]), audio_num_frames=layout.audio_frames,
                        video_coords=coords[0], audio_coords=coords[1], isolate_modalities=isolate,
                        spatio_temporal_guidance_blocks=blocks, perturbation_mask=None, use_cross_timestep=True,
                        return_dict=False)

            return name, call

        extra = cond.extra
        calls = [forward("cond", cond.prompt_embeds, extra["audio_embeds"], extra["mask"])]
        if cfg:
            calls.append(forward("uncond", cond.negative_embeds, extra["negative_audio_embeds"], extra["negative_mask"]))
        if stg:
            calls.append(forward("stg", cond.prompt_embeds, extra["audio_embeds"], extra["mask"],
                                 blocks=list(terms["stg_blocks"])))
        if modality:
            calls.append(forward("modality", cond.prompt_embeds, extra["audio_embeds"], extra["mask"], isolate=True))
        # x0 = x - sigma * v of each branch (the pipeline guides in x0 space)
        x0 = {name: (video - out_video.float() * sigma, audio - out_audio.float() * sigma)
              for (name, _), (out_video, out_audio) in zip(calls, step.run_branches(model, calls))}
        video_x0, audio_x0 = x0["cond"]
        video_delta = audio_delta = 0
        if cfg:
            video_u, audio_u = x0["uncond"]
            video_delta = (guidance - 1) * (video_x0 - video_u)
            audio_delta = (audio_scale - 1) * (audio_x0 - audio_u)
        if stg:
            video_s, audio_s = x0["stg"]
            video_delta = video_delta + terms["stg"] * (video_x0 - video_s)
            audio_delta = audio_delta + terms["audio_stg"] * (audio_x0 - audio_s)
        if modality:
            video_m, audio_m = x0["modality"]
            video_delta = video_delta + (terms["modality"] - 1) * (video_x0 - video_m)
            audio_delta = audio_delta + (terms["audio_modality"] - 1) * (audio_x0 - audio_m)
        forwards = len(calls)
        video_g, audio_g = video_x0 + video_delta, audio_x0 + audio_delta
        if terms["rescale"] > 0:
            video_g = rescale(video_g, video_x0, terms["rescale"])
        if terms["audio_rescale"] > 0:
            audio_g = rescale(audio_g, audio_x0, terms["audio_rescale"])
        # back to velocity: v = (x - x0) / sigma
        video_v = (video - video_g) / sigma
        audio_v = (audio - audio_g) / sigma
        if image_mask is not None:  # the image frame's tokens stay as they are
            video_v = video_v * (1 - image_mask).unsqueeze(-1)
        return Layout.join(video_v, audio_v), forwards

    # --- previews and decode -----------------------------------------------------------------------
    def preview_latents(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The video stream of the flat ``latents`` as the normalised grid ``(1, C, F, H, W)`` that
        :class:`engine.preview.LatentPreviewer` reads (the audio stream gets no preview)."""
        layout = Layout(**cond.extra["layout"])
        video, _ = layout.split(latents.detach())
        patch_t, patch, _ = self.info.patch_size
        return unpack_video(video, layout.frames, layout.height, layout.width, patch, patch_t)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: Conditioning):
        """Both streams decoded: an :class:`engine.video.Clip` of float32 frames ``(F, H, W, 3)``
        in ``[0, 1]`` and the vocoder's waveform at its output rate."""
        from relay.engine.video import Clip

        layout = Layout(**cond.extra["layout"])
        video, audio = layout.split(latents.to(self.device, torch.float32))
        patch_t, patch, _ = self.info.patch_size
        vae = self.model.vae
        grid = unpack_video(video, layout.frames, layout.height, layout.width, patch, patch_t)
        timestep = None
        if vae.config.timestep_conditioning:  # decode_timestep 0 and no decode noise (pipeline defaults)
            timestep = torch.zeros(1, device=self.device, dtype=vae.dtype)
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(grid)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(grid)
        grid = grid * std / vae.config.scaling_factor + mean
        pixels = vae.decode(grid.to(vae.dtype), timestep, return_dict=False)[0]
        frames = np.asarray(self.video_processor.postprocess_video(pixels, output_type="np")[0], dtype=np.float32)
        audio_vae, vocoder = self.model.components["audio_vae"], self.model.components["vocoder"]
        audio = audio * audio_vae.latents_std.to(audio) + audio_vae.latents_mean.to(audio)
        spectrogram = audio.unflatten(2, (-1, layout.mel_bins)).transpose(1, 2)
        mel = audio_vae.decode(spectrogram.to(audio_vae.dtype), return_dict=False)[0]
        waveform = vocoder(mel.to(vocoder.dtype))[0].float().cpu().numpy()
        return Clip(frames=frames, audio=waveform, sample_rate=int(vocoder.config.output_sampling_rate))


class StepInputs:
    """What a run feeds the transformer besides the guidance, which :meth:`Pipeline.predict`
    builds (positions, per-token timesteps and the four forwards need the step's context).

    Args:
        cond: The run's conditioning.
        device: The run device.
    """

    def __init__(self, cond: Conditioning, device: torch.device) -> None:
        self.cond = cond
        self.device = device

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The flat latents (the guidance splits them)."""
        return latents

    def timestep(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The step's timestep, one per sample."""
        return t.expand(batch)


def rotary_coords(model, layout: Layout, fps: float, device: torch.device):
    """``(video_coords, audio_coords)`` of the transformer's rotary embeddings for ``layout``."""
    video = model.rope.prepare_video_coords(1, layout.frames, layout.height, layout.width, device, fps=fps)
    audio = model.audio_rope.prepare_audio_coords(1, layout.audio_frames, device)
    return video, audio
