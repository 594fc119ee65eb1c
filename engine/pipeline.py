"""The engine: request -> conditioning + noise -> denoise (per-expert) -> decode -> frames.

Stages are separate methods so that workers can run them on different groups:
:meth:`Engine.prepare` (conditioning, the expert schedule and the initial noise) produces a
:class:`~engine.state.DenoiseState`; :meth:`Engine.start` turns any state into a
:class:`~engine.denoise.DenoiseRun`; :meth:`Engine.decode` turns finished latents into frames.
The family-specific parts (text and image conditioning, per-step inputs, the VAE) come from the
model family's pipeline (the spec's ``pipeline``; for Wan :mod:`engine.models.wan.pipeline`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from relay.engine.denoise import DenoiseRun, StepEvent
from relay.engine.loader import DeviceExperts, LoadedModel
from relay.engine.request import GenerationRequest, ResolvedRequest, resolve_request
from relay.engine.state import DenoiseState, capture_solver


class Engine:
    """Runs generations on one device with a :class:`~engine.loader.LoadedModel`.

    Args:
        model: The loaded model.
        vote: ``(expert name) -> vote`` for first-block cache decisions across a worker group
            (:class:`parallel.caches.GroupVote`); ``None``: one process decides alone.
        branches: Branch forwards of a request per forward on this rank (2 under CFG-parallel).
    """

    def __init__(self, model: LoadedModel, *, vote=None, branches: int = 1) -> None:
        from relay.engine.caches import ExpertCaches

        self.model = model
        #: The feature caches of the current request (:mod:`engine.caches`).
        self.caches = ExpertCaches(vote, branches=branches, taylorseer_modules=model.spec.taylorseer_modules)
        self.info = model.info
        self.spec = model.spec
        self.device = model.device
        self.family = self.spec.pipeline(model)
        self._adapters = None
        #: What the last :meth:`start` did to the experts' LoRAs (:class:`engine.lora.FuseReport`).
        self.lora_reports: list = []

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Validates ``request`` (prompt length included) and fills its defaults."""
        return resolve_request(request, self.info, tokenizer=self.model.tokenizer)

    @torch.no_grad()
    def prepare(self, request: ResolvedRequest) -> DenoiseState:
        """Encodes the conditioning and draws the initial noise: the state before step 0."""
        from relay.engine.solvers import set_schedule

        scheduler = self.spec.build_scheduler(self.info, request.shift, request.solver)
        family_schedule = getattr(self.family, "set_schedule", None)  # LTX-2: size-dependent sigmas
        if family_schedule is not None:
            family_schedule(scheduler, request)
        else:
            set_schedule(scheduler, request.steps, request.timesteps, device=self.device)
        timesteps = [float(t) for t in scheduler.timesteps.cpu().tolist()]
        experts = self.spec.expert_schedule(self.info, request.steps, request.shift, request.boundary,
                                            solver=request.solver, timesteps=request.timesteps)
        needs_uncond = request.guidance > 1.0 or (request.guidance_low or 0.0) > 1.0
        cond, latents, generator = self.family.encode(request, needs_uncond=needs_uncond)
        return DenoiseState(
            request=request.to_dict(), step_index=0, timesteps=timesteps, experts=experts,
            latents=latents, solver=capture_solver(scheduler), rng_state=generator.get_state(),
            conditioning=cond,
        )

    def start(self, state: DenoiseState, *, predict: Callable | None = None,
              runner: Callable | None = None) -> DenoiseRun:
        """A :class:`DenoiseRun` that continues ``state`` on this engine's experts, with the
        request's LoRAs fused into them (:meth:`apply_loras`) and fresh feature caches
        (:meth:`engine.caches.ExpertCaches.begin`: nothing is kept from an earlier request).

        ``predict`` replaces the guided prediction (Wan's CFG-parallel); ``runner`` runs the
        branch forwards of a family's own guidance (LTX-2's CFG-parallel)."""
        self.model.begin_run()  # offload: no prefetch or cache left over from an earlier run
        self.apply_loras(state.request.get("loras") or ())
        self.caches.begin(self.model.experts, state.request, list(state.experts))
        return DenoiseRun(
            state, experts=DeviceExperts(self.model),
            scheduler=self.spec.build_scheduler(self.info, float(state.request["shift"]),
                                                state.request.get("solver")),
            device=self.device, inputs=self.family.step_inputs,
            predict=predict or getattr(self.family, "predict", None), runner=runner,
            caches=self.caches if self.caches.active else None,
        )

    def apply_loras(self, loras) -> list:
        """Makes each held expert's weights base + its share of ``loras`` (resolved
        :class:`~engine.lora.LoraChoice` entries or their dicts; ``()`` = the base weights).
        Nothing happens for an expert whose set is already fused; an offloaded expert is parked
        in host memory first, so that its host copy is the one that changes."""
        from relay.engine.lora import Adapters

        if self._adapters is None:
            if not loras:
                self.lora_reports = []
                return []
            self._adapters = Adapters.for_model(self.model)
        self.lora_reports = self._adapters.ensure(loras, before=self.model.park if self.model.offload else None)
        return self.lora_reports

    def decode_clip(self, state: DenoiseState | DenoiseRun):
        """Decodes finished latents to a :class:`engine.video.Clip`: float32 frames ``(F, H, W,
        3)`` in ``[0, 1]``, and the sound of a family that makes it (``None`` on a rank of a
        split decode that does not hold the output)."""
        from relay.engine.video import as_clip

        cond = state.cond if isinstance(state, DenoiseRun) else state.conditioning
        media = self.family.decode(state.latents, cond)
        return None if media is None else as_clip(media)

    def decode(self, state: DenoiseState | DenoiseRun) -> np.ndarray:
        """Decodes finished latents to float32 frames ``(F, H, W, 3)`` in ``[0, 1]`` (the
        picture of :meth:`decode_clip`)."""
        clip = self.decode_clip(state)
        return None if clip is None else clip.frames

    def generate(self, request: GenerationRequest | ResolvedRequest, *,
                 callback: Callable[[StepEvent], object] | None = None) -> np.ndarray:
        """Validates, prepares, denoises and decodes one request; returns its frames."""
        resolved = request if isinstance(request, ResolvedRequest) else self.resolve(request)
        run = self.start(self.prepare(resolved))
        run.run(callback=callback)
        return self.decode(run)

    def generate_clip(self, request: GenerationRequest | ResolvedRequest, *,
                      callback: Callable[[StepEvent], object] | None = None):
        """:meth:`generate`, returning the :class:`engine.video.Clip` (frames and sound)."""
        resolved = request if isinstance(request, ResolvedRequest) else self.resolve(request)
        run = self.start(self.prepare(resolved))
        run.run(callback=callback)
        return self.decode_clip(run)
