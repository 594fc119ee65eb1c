"""Resume: a snapshot after any step, resumed in a new process, finishes bit-identically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "6", "--seed", "5",
            "--guidance", "4", "--guidance-low", "3", "--shift", "5", "--dtype", "fp32",
            "--device", "cpu", "--quiet"]
SWITCH = 3  # 3 high-noise steps, then the low-noise expert (checked below)


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, tmp_path_factory):
    """One full run that also writes snapshots after steps 1, 2, 3 (the switch) and 5."""
    from relay.cli.main import main

    folder = tmp_path_factory.mktemp("resume")
    out = folder / "full.npy"
    code = main(["generate", "--model", str(tiny_models["t2v"]), "--prompt", "a boat on a river",
                 *SETTINGS, "--output", str(out), "--checkpoint-dir", str(folder / "ck"),
                 "--checkpoint-at", f"1,2,{SWITCH},5"])
    assert code == 0
    return np.load(out), folder / "ck"


def test_snapshot_steps_straddle_the_expert_switch(uninterrupted):
    from relay.engine.state import DenoiseState

    state = DenoiseState.load(uninterrupted[1] / f"step-{SWITCH:04d}.pt")
    assert state.step_index == SWITCH
    assert state.experts[SWITCH - 1] == "high_noise" and state.experts[SWITCH] == "low_noise"


@pytest.mark.parametrize("step", [1, 2, SWITCH, 5])
def test_resume_in_new_process_is_bit_identical(step, uninterrupted, tiny_models, tmp_path):
    full, folder = uninterrupted
    out = tmp_path / "resumed.npy"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "resume", str(folder / f"step-{step:04d}.pt"),
         "--model", str(tiny_models["t2v"]), "--dtype", "fp32", "--device", "cpu", "--quiet",
         "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(out), full)


def test_resume_from_latents_alone_differs(uninterrupted, tiny_models):
    """Dropping the solver history (keeping latents and step index) must change the result:
    this guards the snapshot's completeness."""
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine
    from relay.engine.state import DenoiseState, capture_solver

    full, folder = uninterrupted
    engine = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    state = DenoiseState.load(folder / f"step-{SWITCH:04d}.pt")

    complete = engine.start(state)
    complete.run()
    assert np.array_equal(engine.decode(complete), full)

    fresh = engine.spec.build_scheduler(engine.info, float(state.request["shift"]))
    fresh.set_timesteps(state.num_steps)
    fresh.set_begin_index(state.step_index)
    state.solver = capture_solver(fresh)
    partial = engine.start(state)
    partial.run()
    assert np.abs(engine.decode(partial) - full).max() > 1e-3


def test_state_round_trips_through_bytes_with_safe_loading(uninterrupted):
    from relay.engine.state import DenoiseState

    path = uninterrupted[1] / "step-0002.pt"
    state = DenoiseState.load(path)
    again = DenoiseState.load(state.to_bytes())
    assert again.step_index == state.step_index and again.experts == state.experts
    assert torch.equal(again.latents, state.latents)
    assert torch.equal(again.rng_state, state.rng_state)
    assert again.solver["attrs"]["lower_order_nums"] == state.solver["attrs"]["lower_order_nums"]
    for a, b in zip(again.solver["attrs"]["model_outputs"], state.solver["attrs"]["model_outputs"]):
        assert torch.equal(a, b)
