"""Solvers and schedules: flow-match Euler and explicit timesteps equal diffusers'
``FlowMatchEulerDiscreteScheduler`` in ``WanPipeline``; the Lightning preset is exactly its
flags; an Euler run resumed across the expert switch is bit-identical."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a paper boat on a stream"
SETTINGS = dict(prompt=PROMPT, seed=7, height=32, width=32, frames=5, guidance=4.0, guidance_low=3.0)
LIGHTNING = (1000.0, 750.0, 500.0, 250.0)


def _diffusers_euler(model_dir, *, steps, shift, timesteps=None, guidance, guidance_low, **settings):
    """WanPipeline with diffusers' flow-match Euler; an explicit schedule goes in as sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if timesteps is not None:
        pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps,
                                                         sigmas=[t / 1000 for t in timesteps])
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=settings["prompt"], negative_prompt="", height=settings["height"], width=settings["width"],
                num_frames=settings["frames"], num_inference_steps=steps, guidance_scale=guidance,
                guidance_scale_2=guidance_low, generator=torch.Generator().manual_seed(settings["seed"]),
                output_type="np").frames[0]


@pytest.fixture(scope="module")
def engine(tiny_models):
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    return Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))


def _run(engine, **fields):
    from relay.engine.request import GenerationRequest

    return engine.generate(engine.resolve(GenerationRequest(**{**SETTINGS, **fields})))


def test_euler_equals_diffusers_flow_match_euler(engine, tiny_models):
    ours = _run(engine, solver="euler", steps=6, shift=5.0)
    theirs = _diffusers_euler(tiny_models["t2v"], steps=6, shift=5.0, **SETTINGS)
    assert np.abs(ours - theirs).max() <= 1e-5
    unipc = _run(engine, steps=6, shift=5.0)
    assert np.abs(ours - unipc).max() > 1e-3  # the solver really changed


def test_explicit_timesteps_equal_diffusers_and_are_shifted(engine, tiny_models):
    from relay.engine.request import GenerationRequest

    resolved = engine.resolve(GenerationRequest(solver="euler", timesteps=LIGHTNING, shift=5.0, **SETTINGS))
    state = engine.prepare(resolved)
    assert resolved.steps == 4
    assert state.timesteps == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    assert state.experts == ["high_noise", "high_noise", "low_noise", "low_noise"]  # boundary 0.875
    ours = _run(engine, solver="euler", timesteps=LIGHTNING, shift=5.0)
    theirs = _diffusers_euler(tiny_models["t2v"], steps=4, shift=5.0, timesteps=LIGHTNING, **SETTINGS)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_lightning_preset_is_its_recipe_and_given_fields_win(engine):
    from relay.engine.request import GenerationRequest

    preset = engine.resolve(GenerationRequest(preset="lightning", prompt=PROMPT, seed=7))
    assert (preset.solver, preset.steps, preset.timesteps, preset.shift, preset.guidance, preset.guidance_low) == \
        ("euler", 4, LIGHTNING, 5.0, 1.0, 1.0)
    assert preset.sources["timesteps"].startswith("preset lightning")
    fields = dict(height=32, width=32, frames=5)
    by_flags = _run(engine, solver="euler", timesteps=LIGHTNING, shift=5.0, guidance=1.0, guidance_low=1.0, **fields)
    by_preset = _run(engine, **{**fields, "guidance": None, "guidance_low": None}, preset="lightning")
    assert np.array_equal(by_flags, by_preset)
    mine = engine.resolve(GenerationRequest(preset="lightning", prompt=PROMPT, steps=8, guidance=2.0))
    assert (mine.steps, mine.timesteps, mine.guidance, mine.solver) == (8, None, 2.0, "euler")


@pytest.mark.parametrize("flags, words", [
    (["--timesteps", "1000,750,800"], "strictly decreasing"),
    (["--timesteps", "1000,500", "--solver", "unipc"], "needs solver euler"),
    (["--timesteps", "1000,500", "--solver", "euler", "--steps", "3"], "has 2 values but steps is 3"),
    (["--timesteps", "1200,500", "--solver", "euler"], "(0, 1000]"),
    (["--timesteps", "1000,x", "--solver", "euler"], "comma-separated numbers"),
    (["--preset", "turbo"], "unknown preset 'turbo'"),
    (["--solver", "dpm"], "invalid choice"),
])
def test_bad_schedules_exit_2_naming_the_flag(flags, words, tiny_models, relay, tmp_path):
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", PROMPT, *flags,
                   "--output", tmp_path / "x.npy", "--quiet")
    assert result.code == 2 and words in result.err, result.err
    assert not (tmp_path / "x.npy").exists()


def test_euler_resume_across_the_expert_switch_is_bit_identical(tiny_models, relay, tmp_path):
    from relay.engine.state import DenoiseState

    settings = ["--prompt", PROMPT, "--seed", "7", "--height", "32", "--width", "32", "--frames", "5",
                "--preset", "lightning", "--dtype", "fp32", "--device", "cpu", "--quiet"]
    full = tmp_path / "full.npy"
    result = relay("generate", "--model", tiny_models["t2v"], *settings, "--output", full,
                   "--checkpoint-dir", tmp_path / "ck", "--checkpoint-at", "2")
    assert result.code == 0, result.err
    snapshot = tmp_path / "ck" / "step-0002.pt"
    state = DenoiseState.load(snapshot)
    assert state.experts[1:3] == ["high_noise", "low_noise"] and state.request["solver"] == "euler"
    resumed = tmp_path / "resumed.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "resume", str(snapshot), "--model", str(tiny_models["t2v"]),
         "--dtype", "fp32", "--device", "cpu", "--quiet", "--output", str(resumed)],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(resumed), np.load(full))
