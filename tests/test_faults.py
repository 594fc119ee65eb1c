"""Faults from outside the worker: a rank of a 2-rank group SIGKILLed mid-step (its peer blocked
in a collective) or SIGSTOPped (a hang: the watchdog), on local processes and on Ray.

The group is rebuilt, the request resumes from its last checkpoint, its frames equal an
undisturbed run bit for bit, no step before the checkpoint runs again (the trace has exactly one
completed call per step, the progress events count up once), and no killed or stopped process
is left behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

SETTINGS = dict(prompt="a paper boat on a stream", height=32, width=32, frames=5, steps=8, seed=5,
                guidance=4.0, guidance_low=3.0, shift=5.0)
KILL_AT = 3  # the fault lands after this many steps (the next step is in flight)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent's wait() is missing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


@pytest.fixture(scope="module")
def t2v(tiny_models):
    from relay.engine.model_info import read_model_info

    return read_model_info(tiny_models["t2v"])


def _executor(t2v, backend: str, step_timeout_s: float = 60.0):
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.tickets import SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    layout = ParallelLayout(ulysses_degree=2)
    resolved = resolve_request(GenerationRequest(**SETTINGS), t2v)
    config = SchedulerConfig(step_timeout_s=step_timeout_s, load_timeout_s=120.0)
    spec = WorkerSpec(model=str(t2v.path), layout=layout, dtype="fp32", device_type="cpu", timeout_s=120.0)
    return Executor(plan_groups(t2v, resolved, layout=layout), spec, backend=backend, config=config), resolved


def _run(executor, t2v, resolved, fault=None):
    """One request; ``fault(pid)`` is applied to rank 1's process once KILL_AT steps are done."""
    from relay.engine.stages import request_experts

    group = executor.groups[0]
    victim = group.pids[1]
    steps, armed = [], threading.Event()

    def on_event(kind, data):
        if kind == "progress":
            steps.append(data["step"])
            if fault is not None and data["step"] == KILL_AT and not armed.is_set():
                armed.set()
                fault(victim)

    ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(t2v, resolved),
                                       on_event=on_event)
    frames = ticket.result(timeout=600)
    calls = [e for e in executor.scheduler.trace if e.request == ticket.request_id and e.kind == "step"]
    return frames, steps, calls, ticket, victim


@pytest.mark.parametrize("backend, fault", [
    ("mp", "sigkill"), ("mp", "sigstop"), ("ray", "sigkill"),
    pytest.param("ray", "sigstop", marks=pytest.mark.slow),  # the same watchdog path as mp, 40 s more
])
def test_a_rank_killed_or_stopped_from_outside_costs_a_rebuild_not_the_request(t2v, backend, fault):
    if backend == "ray":
        from relay.launch.ray_group import connect, shutdown

        started = connect(num_cpus=16)
    try:
        executor, resolved = _executor(t2v, backend, step_timeout_s=6.0 if fault == "sigstop" else 60.0)
        with executor:
            undisturbed, _, _, _, _ = _run(executor, t2v, resolved)
            before = executor.scheduler.restarts["fused0"]
            send = signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP
            frames, steps, calls, ticket, victim = _run(executor, t2v, resolved, lambda pid: os.kill(pid, send))
            assert np.array_equal(frames, undisturbed)  # bit-identical after the rebuild
            assert executor.scheduler.restarts["fused0"] == before + 1 and ticket.attempts == 1
            # Nothing before the checkpoint ran twice: one completed call per step, steps counted once.
            assert steps == list(range(1, SETTINGS["steps"] + 1))
            assert len(calls) == SETTINGS["steps"]
            assert victim not in executor.groups[0].pids
            deadline = time.monotonic() + 30
            while _alive(victim) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(victim) and not _stopped(victim), "the faulty rank outlived the rebuild"
    finally:
        if backend == "ray" and started:
            shutdown()
