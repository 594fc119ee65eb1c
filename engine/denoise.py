"""The denoise loop as a resumable state machine.

:class:`DenoiseRun` owns a scheduler restored from a :class:`~engine.state.DenoiseState` and
runs one step at a time: pick the step's expert (precomputed on the CPU), run the conditional
and, when that expert's guidance is above 1, the unconditional forward, combine them, and let
the solver advance the latents. What the transformer is fed at each step (the latents, an image
condition, per-token timesteps) is the model family's business: the run is given the family's
step-input builder. :meth:`DenoiseRun.snapshot` can be taken after any step.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from relay.engine.experts import LOW
from relay.engine.state import DenoiseState, capture_solver, restore_solver

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class StepEvent:
    """Progress after a step.

    Attributes:
        step: Steps done so far (1-based count of the step just finished).
        total: Total steps.
        expert: Expert that ran the step (``high_noise``, ``low_noise`` or ``dense``).
        timestep: The step's scheduler timestep.
        elapsed: Seconds since this run started.
        eta: Estimated seconds until the last step finishes.
        duration: Seconds the step took on this worker.
        forwards: Transformer forwards the step ran for the request (2 with classifier-free
            guidance, 1 without; a CFG-parallel pair's two halves are its two forwards).
        skipped: Forwards the step's guidance called for that a feature cache answered instead
            (:mod:`engine.caches`); ``forwards + skipped`` is the step's branch count.
        lockstep: Skipped forwards whose blocks still ran so that the group's ranks stayed in
            step (another rank's branch computed); their output is the cached one.
        cache: What the expert's cache reports on its last step (MagCache calibration ratios),
            else ``None``.
    """

    step: int
    total: int
    expert: str
    timestep: int
    elapsed: float
    eta: float
    duration: float = 0.0
    forwards: int = 1
    skipped: int = 0
    lockstep: int = 0
    cache: dict | None = None


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """What a guidance rule may need besides the model inputs (LTX-2 guides in x0 space, which
    needs the step's sigma and the fp32 latents).

    Attributes:
        index: The step's index.
        latents: The run's current latents (fp32, before the model's dtype cast).
        scheduler: The run's scheduler (``scheduler.sigmas[index]`` is the step's sigma).
        request: The resolved request settings.
    """

    index: int
    latents: torch.Tensor
    scheduler: object
    request: Mapping
    runner: Callable | None = None

    def run_branches(self, model, calls) -> list:
        """Runs the step's branch forwards ``calls`` (``[(name, forward)]``, ``forward()`` runs
        one inside its cache context) and returns their outputs in order: here one after the
        other, or split over a CFG-parallel group (:class:`parallel.cfg.CfgParallelBranches`)."""
        if self.runner is not None:
            return self.runner(model, calls)
        return [forward() for _, forward in calls]


def guidance_for(request: Mapping, expert: str) -> float:
    """The guidance scale that applies to ``expert`` for this request."""
    return request["guidance_low"] if expert == LOW else request["guidance"]


class DenoiseRun:
    """Runs the denoise steps of one request on the experts it is given.

    Args:
        state: Where to start (a fresh state from ``Engine.prepare`` or any snapshot).
        experts: Expert modules by name; only those the remaining steps need must be present.
        scheduler: A freshly built scheduler of the model's config with the request's shift;
            its state is replaced by the snapshot's.
        device: Device the experts run on.
        inputs: ``(conditioning, latents shape, device) -> builder`` whose ``model_input(latents)``
            and ``timestep(t, batch)`` give the transformer's inputs (the family pipeline's
            ``step_inputs``).
        predict: The guided noise prediction, replacing :func:`guided_prediction` (the family's
            own guidance, CFG-parallel); called as ``predict(model, x, timestep, conditioning,
            guidance, branch=..., step=...)``, returns ``(noise, forwards)``; ``branch(name)`` is
            the context of a ``cond`` / ``uncond`` forward, ``step`` the :class:`StepContext`.
        runner: How a family's own guidance runs its branch forwards (:meth:`StepContext.run_branches`;
            ``None``: one after the other).
        caches: The request's feature caches (:class:`~engine.caches.ExpertCaches`, already
            begun for this request), or ``None``. A state taken in the middle of a cached
            expert's steps is continued by replaying them from ``state.anchor`` (the cache's
            tensors are not in a checkpoint), so the result equals an undisturbed run.
    """

    def __init__(self, state: DenoiseState, *, experts: Mapping[str, torch.nn.Module], scheduler,
                 device: torch.device, inputs: Callable, predict: Callable | None = None,
                 caches=None, runner: Callable | None = None) -> None:
        self.device = device
        self.runner = runner
        self.experts = experts
        self.scheduler = scheduler
        self.predict = predict or guided_prediction
        self._request = state.request
        self._timesteps = list(state.timesteps)
        self._experts = list(state.experts)
        self.step_index = state.step_index
        self._generator = torch.Generator("cpu")
        self._generator.set_state(state.rng_state)
        restore_solver(scheduler, state.solver, device)
        self.latents = state.latents.to(device)
        self.cond = _map_conditioning(state.conditioning, device)
        self._step_takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        self._inputs = inputs(self.cond, self.latents.shape, device)
        self.caches = caches
        self._anchor = state.anchor
        self._anchor_sent = state.anchor
        self._started = time.perf_counter()
        self._steps_run = 0
        self._ran: set[str] = set()  # experts that ran a step in this run (on this worker)
        self.replayed = self._catch_up()

    @property
    def request(self) -> dict:
        """The resolved request settings this run denoises."""
        return self._request

    @property
    def num_steps(self) -> int:
        """Total number of denoising steps of this request."""
        return len(self._timesteps)

    @property
    def done(self) -> bool:
        """True when every step has run."""
        return self.step_index >= len(self._timesteps)

    @property
    def next_expert(self) -> str | None:
        """The expert of the next step, or ``None`` when done."""
        return None if self.done else self._experts[self.step_index]

    def _cached(self, expert: str | None) -> bool:
        return expert is not None and self.caches is not None and self.caches.enabled(expert)

    def _segment_start(self, index: int) -> int:
        start = index
        while start > 0 and self._experts[start - 1] == self._experts[index]:
            start -= 1
        return start

    @torch.no_grad()
    def _catch_up(self) -> int:
        """Replays the current cached segment from its anchor up to the state's step (a resume
        in the middle of a cached expert's steps); returns the steps replayed."""
        expert = self.next_expert
        if not self._cached(expert):
            return 0
        start, target = self._segment_start(self.step_index), self.step_index
        anchor = self._anchor
        if start == target:
            return 0  # at the segment start: nothing to replay
        if anchor is None or anchor["step_index"] != start:
            log.warning("resuming step %d of a cached %s segment without its anchor: the cache starts cold, so "
                        "the result may differ from an undisturbed run", target, expert)
            return 0
        restore_solver(self.scheduler, anchor["solver"], self.device)
        self.latents = anchor["latents"].to(self.device)
        self._generator.set_state(anchor["rng_state"])
        self.step_index = start
        while self.step_index < target:
            self.step()
        self._steps_run = 0
        self._started = time.perf_counter()
        return target - start

    @torch.no_grad()
    def step(self) -> StepEvent:
        """Runs the next step and returns its progress event."""
        if self.done:
            raise RuntimeError("all steps have already run")
        index = self.step_index
        expert = self._experts[index]
        if expert not in self.experts:
            raise RuntimeError(f"step {index} needs the {expert} expert, which is not loaded here")
        model = self.experts[expert]
        following = self._experts[index + 1] if index + 1 < len(self._experts) else None
        if (following is not None and following != expert and expert in self._ran
                and hasattr(self.experts, "prefetch")):
            # Offload: the next expert's copies overlap this step. Only once this expert has run
            # a step here: its activations then hold their memory, which the copies leave alone.
            self.experts.prefetch(following)
        if self._segment_start(index) == index:  # where this expert's cache starts (none: no anchor)
            self._anchor = self._progress_fields() if self._cached(expert) else None
        t = self.scheduler.timesteps[index]
        began = time.perf_counter()
        x = self._inputs.model_input(self.latents).to(model.dtype)
        timestep = self._inputs.timestep(t, self.latents.shape[0])
        branch = (lambda name: self.caches.branch(expert, name)) if self._cached(expert) else _no_branch
        noise, forwards = self.predict(model, x, timestep, self.cond, guidance_for(self._request, expert),
                                       branch=branch, step=StepContext(index=index, latents=self.latents,
                                                                       scheduler=self.scheduler,
                                                                       request=self._request, runner=self.runner))
        skipped, lockstep = self.caches.take(expert) if self._cached(expert) else (0, 0)
        skipped, lockstep = min(skipped, forwards), min(lockstep, forwards)  # CFG halves on one branch
        last = index + 1 == len(self._experts) or self._experts[index + 1] != expert
        report = self.caches.report().get(expert) if last and self._cached(expert) else None
        if last and self._cached(expert):
            self.caches.finish(expert)  # its tensors are not needed by the other expert or the decode
        kwargs = {"return_dict": False}
        if self._step_takes_generator:
            kwargs["generator"] = self._generator
        self.latents = self.scheduler.step(noise, t, self.latents, **kwargs)[0]
        self.step_index += 1
        self._steps_run += 1
        self._ran.add(expert)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest per-step timing for progress and ETA
        now = time.perf_counter()
        elapsed = now - self._started
        remaining = len(self._timesteps) - self.step_index
        return StepEvent(step=self.step_index, total=len(self._timesteps), expert=expert,
                         timestep=int(self._timesteps[index]), elapsed=elapsed,
                         eta=elapsed / self._steps_run * remaining, duration=now - began,
                         forwards=forwards - skipped, skipped=skipped, lockstep=lockstep, cache=report)

    def run(self, *, until: int | None = None, callback: Callable[[StepEvent], object] | None = None,
            stop: Callable[[], bool] | None = None) -> None:
        """Runs steps until ``until`` (exclusive step index), the end, or ``stop()`` is true.

        ``stop`` is polled at step boundaries only, so a group of ranks stops in lock-step.
        """
        end = len(self._timesteps) if until is None else min(until, len(self._timesteps))
        while self.step_index < end:
            if stop is not None and stop():
                return
            event = self.step()
            if callback is not None:
                callback(event)

    def _progress_fields(self) -> dict:
        return {"step_index": self.step_index, "latents": self.latents.detach().to("cpu", copy=True),
                "solver": capture_solver(self.scheduler), "rng_state": self._generator.get_state()}

    def progress(self) -> dict:
        """What changes from step to step, on the CPU: step index, latents, solver and RNG state
        (and, once per cached segment, its ``anchor``).

        Together with the state this run started from, it is a complete checkpoint
        (:meth:`DenoiseState.advanced`) without re-shipping the conditioning every step (at 720p
        I2V the text embeddings and image condition are ~30 MB, the latents ~20 MB).
        """
        out = self._progress_fields()
        if self._anchor is not self._anchor_sent:
            out["anchor"] = self._anchor_sent = self._anchor
        return out

    def snapshot(self) -> DenoiseState:
        """The state after the last completed step, on the CPU."""
        state = DenoiseState(
            request=self._request, step_index=self.step_index, timesteps=self._timesteps,
            experts=self._experts, latents=self.latents, solver=capture_solver(self.scheduler),
            rng_state=self._generator.get_state(), conditioning=self.cond, anchor=self._anchor,
        )
        return state.to_cpu()


def _no_branch(name: str):
    return nullcontext()


def forward(model, x: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, *, name: str,
            branch: Callable = _no_branch) -> torch.Tensor:
    """One transformer forward of branch ``name`` (``cond`` / ``uncond``) inside its cache context."""
    with branch(name):
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]


def guided_prediction(model, x: torch.Tensor, timestep: torch.Tensor, cond,
                      guidance: float, *, branch: Callable = _no_branch,
                      step: StepContext | None = None) -> tuple[torch.Tensor, int]:
    """Classifier-free guidance: ``uncond + g * (cond - uncond)``; a single forward when g <= 1.

    Returns:
        ``(noise prediction, forwards run)``.
    """
    noise = forward(model, x, timestep, cond.prompt_embeds, name="cond", branch=branch)
    if guidance <= 1.0 or cond.negative_embeds is None:
        return noise, 1
    uncond = forward(model, x, timestep, cond.negative_embeds, name="uncond", branch=branch)
    return uncond + guidance * (noise - uncond), 2


def _map_conditioning(cond, device: torch.device):
    def move(value):
        if torch.is_tensor(value):
            return value.to(device)
        if isinstance(value, dict):
            return {name: move(item) for name, item in value.items()}
        return value

    return replace(cond, **{name: move(value) for name, value in vars(cond).items()})
