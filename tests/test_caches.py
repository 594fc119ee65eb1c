"""Feature caches (:mod:`engine.caches`): the syntax, parity with diffusers' own cache hooks in
diffusers' own pipeline, agreement across a worker group, per-request state and resume.

The references are independent: diffusers' ``WanPipeline`` with ``enable_cache`` on both
transformers, and Relay's single-process run (itself checked against that pipeline).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relay.engine.errors import ValidationError

# 8 steps at shift 5: 4 high-noise then 4 low-noise steps. On the tiny model a first-block
# threshold of 0.04 skips some forwards and computes others on both experts.
SETTINGS = dict(prompt="a cat in the rain", negative_prompt="blurry", height=32, width=48, frames=9,
                steps=8, seed=7, guidance=4.0, guidance_low=3.0, shift=5.0)
FBC = 0.04
TAYLOR = dict(interval=2, warmup=1)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_models):
    from relay.engine import Engine, load_model

    return Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))


def _run(engine, **fields):
    from relay.engine import GenerationRequest

    events = []
    frames = engine.generate(engine.resolve(GenerationRequest(**dict(SETTINGS, **fields))), callback=events.append)
    return frames, events


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_models["t2v"])
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=SETTINGS["shift"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, config_high, config_low, **size):
    pipe.transformer.enable_cache(config_high)
    pipe.transformer_2.enable_cache(config_low)
    try:
        s = dict(SETTINGS, **size)
        return pipe(prompt=s["prompt"], negative_prompt=s["negative_prompt"], height=s["height"], width=s["width"],
                    num_frames=s["frames"], num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                    guidance_scale_2=s["guidance_low"], generator=torch.Generator().manual_seed(s["seed"]),
                    output_type="np").frames[0]
    finally:
        pipe.transformer.disable_cache()
        pipe.transformer_2.disable_cache()


def _skips(events, expert=None) -> int:
    return sum(e.skipped for e in events if expert is None or e.expert == expert)


# --- syntax ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,canonical", [
    ("none", "none"), ("fbc:0.05", "fbc:0.05"), ("FBC: 0", "fbc:0"),
    ("taylorseer", "taylorseer"), ("taylorseer:warmup=2,interval=3", "taylorseer:interval=3,warmup=2"),
    ("taylorseer:modules=lite", "taylorseer"), ("taylorseer:modules=blocks,order=2", "taylorseer:modules=blocks,order=2"),
    ("mag:calibrate", "mag:calibrate"), ("mag:0.1,k=2,ratios=1/1.01/0.99", "mag:0.1,k=2,ratios=1/1.01/0.99"),
])
def test_cache_syntax_is_canonical(text, canonical):
    from relay.engine.caches import CacheSpec

    assert CacheSpec.parse(text).text() == canonical
    assert CacheSpec.parse(canonical).text() == canonical


@pytest.mark.parametrize("text,words", [
    ("teacache:0.1", "unknown cache"), ("fbc", "one threshold"), ("fbc:-1", "threshold"), ("fbc:x", "number"),
    ("fbc:nan", "threshold"), ("mag:0.1", "ratios"), ("mag:0.1,ratios=1/-2", "positive"),
    ("taylorseer:interval=0", "interval"), ("taylorseer:speed=2", "expected one of"), ("none:1", "no arguments"),
    ("taylorseer:warmup=0", "warmup"), ("taylorseer:modules=all", "modules"),
])
def test_bad_cache_specs_name_the_field(text, words):
    from relay.engine.caches import CacheSpec

    with pytest.raises(ValidationError) as caught:
        CacheSpec.parse(text, field_name="cache_low")
    assert caught.value.field == "cache_low" and words in str(caught.value)


def test_per_expert_overrides_resolve(engine, tiny_models):
    from relay.engine import GenerationRequest
    from relay.engine.model_info import read_model_info
    from relay.engine.request import resolve_request

    resolved = engine.resolve(GenerationRequest(prompt="x", cache="fbc:0.1", cache_low="taylorseer"))
    assert resolved.caches == {"high_noise": "fbc:0.1", "low_noise": "taylorseer"}
    assert resolved.sources["caches"] == "request"
    assert engine.resolve(GenerationRequest(prompt="x")).caches == {"high_noise": "none", "low_noise": "none"}
    dense = read_model_info(tiny_models["ti2v"])
    with pytest.raises(ValidationError) as caught:
        resolve_request(GenerationRequest(prompt="x", cache_high="fbc:0.1"), dense)
    assert caught.value.field == "cache_high"


# --- one process: against diffusers ---------------------------------------------------------
def test_fbc_zero_is_bit_identical_to_no_cache(engine):
    plain, _ = _run(engine)
    cached, events = _run(engine, cache="fbc:0")
    assert np.array_equal(plain, cached)
    assert _skips(events) == 0 and sum(e.forwards for e in events) == 16


def test_fbc_equals_diffusers_first_block_cache_on_both_experts(engine, pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    plain, _ = _run(engine)
    ours, events = _run(engine, cache=f"fbc:{FBC}")
    reference = _diffusers(pipe, FirstBlockCacheConfig(threshold=FBC), FirstBlockCacheConfig(threshold=FBC))
    for expert in ("high_noise", "low_noise"):  # both experts skip some forwards and compute others
        assert 0 < _skips(events, expert) < 8, [(e.expert, e.skipped) for e in events]
    assert all(e.forwards + e.skipped == 2 for e in events)
    assert np.abs(ours - plain).max() > 1e-3, "the cache must change the video, or parity proves nothing"
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


def test_taylorseer_and_magcache_equal_diffusers(engine, pipe):
    from diffusers.hooks import MagCacheConfig, TaylorSeerCacheConfig

    patterns = list(engine.spec.taylorseer_modules)
    for suffix, kwargs in (("", dict(use_lite_mode=True)), (",modules=blocks", dict(cache_identifiers=patterns))):
        ours, events = _run(engine, cache=f"taylorseer:interval=2,warmup=1{suffix}")
        config = lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,  # noqa: E731
                                               taylor_factors_dtype=torch.float32, **kwargs)
        assert _skips(events) == 8, suffix  # every other step of each expert after its first
        np.testing.assert_allclose(ours, _diffusers(pipe, config(), config()), atol=TOLERANCE, rtol=0)

    _, calibration = _run(engine, cache="mag:calibrate")
    ratios = {e.expert: e.cache["mag_ratios"] for e in calibration if e.cache}
    assert set(ratios) == {"high_noise", "low_noise"} and all(len(r) == 4 for r in ratios.values())
    flag = {name: "mag:0.05,k=2,ratios=" + "/".join(map(str, r)) for name, r in ratios.items()}
    ours, events = _run(engine, cache_high=flag["high_noise"], cache_low=flag["low_noise"])
    assert 0 < _skips(events) < 16
    configs = [MagCacheConfig(threshold=0.05, max_skip_steps=2, num_inference_steps=4, mag_ratios=ratios[name])
               for name in ("high_noise", "low_noise")]
    np.testing.assert_allclose(ours, _diffusers(pipe, *configs), atol=TOLERANCE, rtol=0)


# --- state per request, resume --------------------------------------------------------------
def test_a_request_after_a_cached_one_equals_a_fresh_engine(engine, tiny_models):
    from relay.engine import Engine, load_model

    _run(engine, cache=f"fbc:{FBC}", seed=1)
    after_plain, _ = _run(engine)
    after_cached, _ = _run(engine, cache=f"fbc:{FBC}")
    fresh = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))
    np.testing.assert_array_equal(after_plain, _run(fresh)[0])
    np.testing.assert_array_equal(after_cached, _run(fresh, cache=f"fbc:{FBC}")[0])
    assert not any(getattr(m, "_cache_config", None) for m in fresh.model.experts.values()) or fresh.caches.active


@pytest.mark.parametrize("cache", [f"fbc:{FBC}", "taylorseer:interval=2,warmup=1"])
def test_resume_after_any_step_equals_an_undisturbed_run(engine, cache):
    """A checkpoint holds the state at the cached segment's first step (the anchor); resuming in a
    new run replays from there, so every resume point gives the undisturbed video bit for bit."""
    from relay.engine import GenerationRequest
    from relay.engine.state import DenoiseState

    resolved = engine.resolve(GenerationRequest(**dict(SETTINGS, cache=cache)))
    run = engine.start(engine.prepare(resolved))
    snapshots = []
    while not run.done:
        run.step()
        snapshots.append(DenoiseState.load(run.snapshot().to_bytes()))
    undisturbed = engine.decode(run)
    for snapshot in snapshots[:-1]:
        assert snapshot.anchor is not None and snapshot.anchor["step_index"] in (0, 4)
        resumed = engine.start(snapshot)
        segment_start = 0 if snapshot.step_index < 4 else 4  # 4 high-noise, then 4 low-noise steps
        assert resumed.replayed == snapshot.step_index - segment_start
        resumed.run()
        np.testing.assert_array_equal(engine.decode(resumed), undisturbed)


def test_without_a_cache_a_checkpoint_has_no_anchor(engine):
    from relay.engine import GenerationRequest

    run = engine.start(engine.prepare(engine.resolve(GenerationRequest(**SETTINGS))))
    run.step()
    assert run.snapshot().anchor is None and "anchor" not in run.progress()


# --- a worker group decides once --------------------------------------------------------------
GROUP_CASES = {
    # 9 tokens over a ring of 2 (the last chunk padded), experts FSDP-sharded over both ranks.
    "ring2-fsdp2-odd-tokens": (dict(ring_degree=2, fsdp_degree=2), dict(height=48, width=48, frames=1)),
    # cond and uncond on separate ranks: where the branches decide differently, the skipping rank
    # runs its blocks in lock-step and still returns its cached output.
    "cfg2": (dict(cfg_degree=2), dict(height=32, width=48, frames=5)),
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_group_with_a_cache_equals_the_single_process_run(case, engine, pipe, tiny_models):
    """The group's video equals the single-process run and diffusers' pipeline with
    ``FirstBlockCacheConfig`` on both transformers; the skip counts are the single process's."""
    from diffusers.hooks import FirstBlockCacheConfig

    from relay.engine import GenerationRequest
    from relay.parallel.layout import ParallelLayout
    from test_parallel import _run_on_processes

    layout_kwargs, size = GROUP_CASES[case]
    resolved = engine.resolve(GenerationRequest(**dict(SETTINGS, **size), cache=f"fbc:{FBC}"))
    events = []
    reference = engine.generate(resolved, callback=events.append)
    plain = engine.generate(engine.resolve(GenerationRequest(**dict(SETTINGS, **size))))
    assert np.abs(reference - plain).max() > 1e-3 and 0 < _skips(events) < 16
    layout = ParallelLayout(**layout_kwargs)
    ours, stats, _, _ = _run_on_processes(tiny_models["t2v"], resolved, layout)
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)
    config = FirstBlockCacheConfig(threshold=FBC)
    np.testing.assert_allclose(ours, _diffusers(pipe, config, FirstBlockCacheConfig(threshold=FBC), **size),
                               atol=TOLERANCE, rtol=0)
    for expert in ("high_noise", "low_noise"):
        counted = stats["experts"][expert]
        assert counted["skipped"] == _skips(events, expert)
        assert counted["forwards"] + counted["skipped"] == 8
    split = sum(1 for e in events if e.skipped == 1)  # steps whose two branches decided differently
    lockstep = sum(stats["experts"][e]["lockstep"] for e in ("high_noise", "low_noise"))
    assert lockstep == (split if layout.cfg_degree == 2 else 0)


# --- the CLI: checkpoints through the scheduler, flags ---------------------------------------
def test_cli_resume_of_a_cached_run_equals_the_full_run(tiny_models, relay, tmp_path):
    """``relay generate --cache ... --checkpoint-at`` then ``relay resume``: the checkpoint the
    scheduler holds (the state advanced by each call's progress, anchor included) resumes exactly."""
    args = ["--height", "32", "--width", "48", "--frames", "9", "--steps", "8", "--seed", "7",
            "--guidance", "4", "--guidance-low", "3", "--shift", "5", "--dtype", "fp32", "--device", "cpu",
            "--quiet"]
    full = tmp_path / "full.npy"
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", SETTINGS["prompt"],
                   "--negative-prompt", SETTINGS["negative_prompt"], *args, "--cache", f"fbc:{FBC}",
                   "--cache-low", "taylorseer:interval=2,warmup=1", "--output", full,
                   "--checkpoint-dir", tmp_path / "ck", "--checkpoint-at", "3,6", "--stats", tmp_path / "s.json")
    assert result.code == 0, result.err
    import json

    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["settings"]["caches"] == {"high_noise": f"fbc:{FBC}", "low_noise": "taylorseer:interval=2,warmup=1"}
    assert stats["experts"]["high_noise"]["skipped"] > 0 and stats["experts"]["low_noise"]["skipped"] > 0
    for step in (3, 6):
        out = tmp_path / f"resumed-{step}.npy"
        result = relay("resume", tmp_path / "ck" / f"step-{step:04d}.pt", "--model", tiny_models["t2v"],
                       "--dtype", "fp32", "--device", "cpu", "--quiet", "--output", out)
        assert result.code == 0, result.err
        np.testing.assert_array_equal(np.load(out), np.load(full))


@pytest.mark.parametrize("flags,flag", [(["--cache", "fbc"], "--cache"), (["--cache-low", "mag:0.1"], "--cache-low")])
def test_bad_cache_flags_exit_2(flags, flag, tiny_models, relay, tmp_path):
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", "x", "--output", tmp_path / "x.npy",
                   "--device", "cpu", *flags)
    assert result.code == 2 and f"error: {flag}:" in result.err, result.err
