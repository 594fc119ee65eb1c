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


def test_offload_moves_only_the_expert_in_use_to_the_device(tiny_models, engine):
    """With offload the result is unchanged; at every step the step's expert is the one resident
    on the run device, and the switch moves the other expert off it (both moves are recorded:
    on a CPU both ends are the CPU, so the moves themselves are what the test can see). A module
    that leaves points at its host copies again: nothing is copied back."""
    from relay.engine import Engine, GenerationRequest, load_model

    offloaded = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu", offload=True))
    model = offloaded.model
    hosts = {name: {id(t): host for t, host in copies.items()} for name, copies in model._host.items()}
    moves = []
    arrive, leave = model._arrive, model._leave

    def arriving(name, module):
        moves.append((name, "run device"))
        return arrive(name, module)

    def leaving(name, module):
        moves.append((name, "home"))
        leave(name, module)
        assert all(t.data_ptr() == hosts[name][id(t)].data_ptr() for t in module.parameters())  # its host copy

    prefetch = model.prefetch

    def asked_ahead(name):
        moves.append((name, f"asked ahead while {model._resident} computes"))
        return prefetch(name)  # off CUDA: nothing starts, the switch copies as before

    model._arrive, model._leave, model.prefetch = arriving, leaving, asked_ahead
    resident = []
    request = GenerationRequest(prompt="a fox", **SETTINGS)
    frames = offloaded.generate(request, callback=lambda event: resident.append((event.expert, model._resident)))
    assert np.array_equal(frames, engine.generate(request))
    assert all(expert == held for expert, held in resident), resident
    assert [e for e, _ in resident] == ["high_noise"] * 3 + ["low_noise"] * 3  # both experts were used
    # The text encoder goes to the device for encoding; each expert arrives once, when it starts,
    # and the high-noise expert leaves when the low-noise one arrives -- no moves on other steps.
    assert ("text_encoder", "run device") in moves
    arrivals = [name for name, where in moves if where == "run device" and name != "text_encoder"]
    assert arrivals == ["high_noise", "low_noise"], moves
    switch = moves.index(("low_noise", "run device"))
    assert ("high_noise", "home") in moves[:switch][-3:], moves
    # The next expert is asked for once, one step ahead: during the high-noise expert's last step.
    ahead = [move for move in moves if move[1].startswith("asked ahead")]
    assert ahead == [("low_noise", "asked ahead while high_noise computes")], moves
    assert moves.index(ahead[0]) < switch
    assert model.prefetches == {"started": 0, "no_room": 0}


def test_a_prefetch_needs_room_for_the_expert_and_the_steps_activations():
    """The next expert is copied in beside the resident one only if its bytes, the activation
    peak already seen and a 5% margin fit in what the device has free (free + allocator cache)."""
    from relay.engine.loader import prefetch_fits

    gib = 2**30
    expert = int(26.6 * gib)  # one A14B expert in bf16
    # An 80 GB H100 with one expert resident (~53 GiB left) and 480p activations: room.
    assert prefetch_fits(expert, int(52.5 * gib), transient=20 * gib)
    # 720p activations of ~25 GiB do not leave room for a second expert: switch as before.
    assert not prefetch_fits(expert, int(52.5 * gib), transient=25 * gib)
    # A 48 GB A6000 never holds two A14B experts.
    assert not prefetch_fits(expert, int(20 * gib), transient=0)
    assert prefetch_fits(100, 100 + 10 + 5, transient=10) and not prefetch_fits(100, 114, transient=10)


def test_stop_is_polled_at_step_boundaries(engine):
    from relay.engine import GenerationRequest

    run = engine.start(engine.prepare(engine.resolve(GenerationRequest(prompt="a fox", **SETTINGS))))
    run.run(stop=lambda: run.step_index >= 2)
    assert run.step_index == 2 and not run.done
    assert torch.isfinite(run.latents).all()
