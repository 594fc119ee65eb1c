"""Engine API: progress events, stage-limited loading, offload placement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SETTINGS = dict(height=32, width=32, frames=5, steps=6, seed=9, guidance=4.0, guidance_low=3.0,
                shift=5.0)


@pytest.fixture(scope="module")
def engine(tiny_models):
    from relay.engine import Engine, load_model

    return Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu"))


def test_step_events_are_complete_and_monotonic(engine):
    from relay.engine import GenerationRequest

    events = []
    engine.generate(GenerationRequest(prompt="a fox", **SETTINGS), callback=events.append)
    assert [e.step for e in events] == list(range(1, 7))
    assert all(e.total == 6 for e in events)
    assert [e.expert for e in events] == ["high_noise"] * 3 + ["low_noise"] * 3
    assert all(a.elapsed <= b.elapsed for a, b in zip(events, events[1:]))
    assert all(a.timestep > b.timestep for a, b in zip(events, events[1:]))
    assert events[-1].eta == 0.0 and all(e.eta >= 0 for e in events)


def test_stage_loads_only_its_expert_and_refuses_the_other(tiny_models, engine):
    """A low-noise stage worker holds only the low-noise expert; it can finish a state handed
    over at the boundary but refuses a high-noise step."""
    from relay.engine import Engine, GenerationRequest, load_model

    request = engine.resolve(GenerationRequest(prompt="a fox", **SETTINGS))
    full = engine.start(engine.prepare(request))
    full.run(until=3)
    handoff = full.snapshot()
    full.run()
    expected = engine.decode(full)

    low = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu",
                            experts=("low_noise",), text_encoder=False))
    assert set(low.model.experts) == {"low_noise"} and low.model.text_encoder is None
    run = low.start(handoff)
    run.run()
    assert np.array_equal(low.decode(run), expected)

    early = engine.start(engine.prepare(request))
    early.run(until=1)
    with pytest.raises(RuntimeError, match="high_noise expert, which is not loaded"):
        low.start(early.snapshot()).step()


def test_offload_keeps_modules_off_the_run_device_until_used(tiny_models, engine):
    """With offload the result is unchanged and the inactive expert rests on the CPU."""
    from relay.engine import Engine, GenerationRequest, load_model

    offloaded = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu", offload=True))
    request = GenerationRequest(prompt="a fox", **SETTINGS)
    assert np.array_equal(offloaded.generate(request), engine.generate(request))
    assert offloaded.model.offload


def test_stop_is_polled_at_step_boundaries(engine):
    from relay.engine import GenerationRequest

    run = engine.start(engine.prepare(engine.resolve(GenerationRequest(prompt="a fox", **SETTINGS))))
    run.run(stop=lambda: run.step_index >= 2)
    assert run.step_index == 2 and not run.done
    assert torch.isfinite(run.latents).all()
