"""Stand-in worker groups: the :class:`~engine.tickets.WorkerGroup` calls, each sleeping for the
seconds a :class:`parallel.simulate.GroupCost` gives, so that the real
:class:`~engine.scheduler.StageScheduler` can be run at cluster-like step times on a laptop.

They carry a real :class:`~engine.state.DenoiseState` (one-element tensors) through prepare,
hand-off, steps and decode, so the scheduler's bookkeeping (checkpoints, stats, metrics) runs as
it does over model workers; only the compute is a sleep. ``relay bench simulator`` runs them
beside the discrete-event simulator (:mod:`parallel.simulate`) to validate it, and to measure the
scheduler's own overhead free of CPU contention.
"""

from __future__ import annotations

import os
import time

from relay.engine.denoise import StepEvent


class SleepGroup:
    """A worker group whose calls sleep ``cost``'s seconds (times ``scale``).

    Args:
        cost: A :class:`parallel.simulate.GroupCost` (name, roles, seconds per call).
        scale: Real seconds per simulated second (``0.01``: a 3 s step sleeps 30 ms).
    """

    backend = "standin"
    health_checked = False

    def __init__(self, cost, *, scale: float = 1.0) -> None:
        self.cost, self.scale = cost, scale
        self.name, self.roles = cost.name, tuple(cost.roles)
        self.slept = 0.0  # seconds asked of time.sleep, for the overhead figure
        self._state = None
        import relay.engine.state  # noqa: F401 - torch loads here, not inside the first timed call

    def _sleep(self, seconds: float) -> None:
        seconds *= self.scale
        if seconds > 0:
            time.sleep(seconds)
            self.slept += seconds

    def describe(self) -> dict:
        """The group's description in run stats."""
        return {"name": self.name, "roles": list(self.roles), "ranks": self.cost.gpus, "layout": "stand-in",
                "backend": self.backend}

    def prepare(self, request: dict, *, timeout_s: float):
        """Sleeps the encode time; returns the request's initial state."""
        import torch

        from relay.engine.state import Conditioning, DenoiseState

        self._sleep(self.cost.encode_s)
        experts = list(request["experts"])
        self._state = DenoiseState(request=request, step_index=0, timesteps=[float(i) for i in range(len(experts))][::-1],
                                   experts=experts, latents=torch.zeros(1), solver={}, rng_state=torch.zeros(1),
                                   conditioning=Conditioning(prompt_embeds=torch.zeros(1)))
        return self._state

    def begin(self, state, *, timeout_s: float) -> None:
        """Takes ``state`` over (sleeping the hand-off) or continues the held one."""
        if state is not None:
            self._sleep(self.cost.handoff_s)
            self._state = state

    def advance_chunks(self, *, until: int, chunks: list[tuple[int, bool]], timeout_s: float):
        """Sleeps each chunk's steps and yields its events and progress."""
        for count, _preview in chunks:
            state = self._state
            events = []
            for step in range(state.step_index, state.step_index + count):
                expert = state.experts[step]
                self._sleep(self.cost.step_s[expert])
                events.append(StepEvent(step=step + 1, total=state.num_steps, expert=expert,
                                        timestep=int(state.timesteps[step]), elapsed=0.0, eta=0.0,
                                        duration=self.cost.step_s[expert] * self.scale))
            progress = {"step_index": state.step_index + count}
            self._state = state.advanced(progress)
            yield events, progress, None

    def decode(self, state, *, timeout_s: float):
        """Sleeps the decode time; no frames."""
        self._sleep(self.cost.decode_s)
        return None, [{"rank": 0, "seconds": self.cost.decode_s * self.scale, "peak_bytes": 0, "measure": "none"}]

    def memory(self, *, timeout_s: float) -> list[dict]:
        """No memory to report."""
        return []

    def ping(self, *, timeout_s: float) -> list:
        """This process's pid."""
        return [os.getpid()]

    def restart(self) -> None:
        """Nothing to rebuild."""
        self._state = None

    def shutdown(self) -> None:
        """Nothing to release."""
        self._state = None

    teardown = shutdown
