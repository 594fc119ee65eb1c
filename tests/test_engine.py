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
    assert model.prefetches == {"started": 0, "no_room": 0, "fell_back": 0}


def test_the_next_expert_is_asked_for_only_after_a_step_of_the_resident_one(tiny_models, engine):
    """A run resumed at the high-noise expert's last step asks for no prefetch (that expert has
    not run here: its activations hold no memory yet, and the copies could take theirs); the
    same run from the start asks once. Both equal the plain run."""
    from relay.engine import Engine, GenerationRequest, load_model

    request = GenerationRequest(prompt="a fox", **SETTINGS)
    reference = engine.generate(request)
    offloaded = Engine(load_model(tiny_models["t2v"], dtype="fp32", device="cpu", offload=True))
    asked = []
    prefetch = offloaded.model.prefetch
    offloaded.model.prefetch = lambda name: asked.append(name) or prefetch(name)
    early = offloaded.start(offloaded.prepare(offloaded.resolve(request)))
    early.run(until=2)  # the high-noise expert's last step is index 2
    assert asked == []
    resumed = offloaded.start(early.snapshot())
    resumed.run()
    assert asked == []  # resumed at the last high-noise step: nothing ran here yet
    assert np.array_equal(offloaded.decode(resumed.snapshot()), reference)
    whole = offloaded.start(offloaded.prepare(offloaded.resolve(request)))
    whole.run()
    assert asked == ["low_noise"] and np.array_equal(offloaded.decode(whole.snapshot()), reference)


def test_offload_leaves_a_text_encoder_placed_on_the_cpu_where_it_is(tiny_models):
    """``--offload --text-encoder cpu`` on one rank (the worker's own loading): the encoder is
    not offloaded -- no host copies are made of it and it never joins the modules that take
    turns on the run device -- while the experts still do."""
    from relay.engine.model_info import read_model_info
    from relay.launch.worker import WorkerSpec, _load
    from relay.parallel.groups import RankInfo, init_groups
    from relay.parallel.layout import ParallelLayout

    info = read_model_info(tiny_models["t2v"])
    groups = init_groups(ParallelLayout(), RankInfo(rank=0, local_rank=0, world_size=1), device_type="cpu")
    spec = WorkerSpec(model=str(info.path), layout=ParallelLayout(), dtype="fp32", text_encoder="cpu", offload=True)
    model = _load(spec, groups, info)
    assert model.offload and model.text_encoder is not None
    assert "text_encoder" not in model._host and {"high_noise", "low_noise"} <= set(model._host)
    moved = []
    arrive = model._arrive
    model._arrive = lambda name, module: moved.append(name) or arrive(name, module)
    assert model.encoder_on_device() is model.text_encoder
    model.on_device("high_noise")
    assert model.encoder_on_device() is model.text_encoder
    assert moved == ["high_noise"] and model._resident == "high_noise" and "text_encoder" not in model._host


def test_a_prefetch_takes_only_memory_no_one_holds():
    """The next expert is copied in beside the resident one only if its bytes and a 5% margin
    fit in the device memory no process holds (the allocator's cache, where the resident
    expert's activations live, is not counted)."""
    from relay.engine.loader import prefetch_fits

    gib = 2**30
    expert = int(26.6 * gib)  # one A14B expert in bf16
    assert prefetch_fits(expert, 28 * gib)  # an 80 GB card: one expert, 480p activations cached
    assert not prefetch_fits(expert, 27 * gib)  # 26.6 + 5% = 27.9 GiB
    assert not prefetch_fits(expert, 10 * gib)  # a 48 GB card never holds two A14B experts
    assert prefetch_fits(100, 105) and not prefetch_fits(100, 104)


def test_host_copies_are_packed_into_few_buffers_exactly():
    """Offload's host copies (pinned on CUDA, where the pinned allocator rounds every allocation
    up to a power of two) are views into buffers of one chunk each, filled largest first: the
    values are the originals', every tensor points at its copy, and the buffers waste little."""
    from relay.engine.loader import pack_host

    torch.manual_seed(0)
    shapes = [(300, 7), (1000,), (64, 64), (3,), (0,), (129, 5), (2, 2, 2)] * 5
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float32, torch.float64, torch.bool]
    tensors = [torch.nn.Parameter(torch.randn(shape).to(dtype), requires_grad=False) if dtype.is_floating_point
               else torch.randint(0, 2, shape).to(dtype) for shape, dtype in zip(shapes, dtypes * 5)]
    before = [t.detach().clone() for t in tensors]
    copies = pack_host(tensors, pin=False, chunk_bytes=16 * 1024)
    assert list(copies) == tensors
    storages = {copy.untyped_storage().data_ptr() for copy in copies.values()}
    aligned = sum(-(-t.numel() * t.element_size() // 64) * 64 for t in tensors)
    assert len(storages) <= -(-aligned // (16 * 1024)) + 1  # first fit, largest first: near-full buffers
    assert all(copy.untyped_storage().nbytes() <= 16 * 1024 for copy in copies.values())
    for tensor, copy, original in zip(tensors, copies.values(), before):
        assert tensor.data.data_ptr() == copy.data_ptr() and tensor.dtype == original.dtype
        assert torch.equal(tensor, original) and tensor.shape == original.shape
    # A tensor larger than the chunk gets a buffer of the next power of two above it.
    big = [torch.zeros(5000, dtype=torch.float32)]  # 20,000 bytes > 16 KiB
    (copy,) = pack_host(big, pin=False, chunk_bytes=16 * 1024).values()
    assert copy.untyped_storage().nbytes() == 20_032 and big[0].data_ptr() == copy.data_ptr()


def test_stop_is_polled_at_step_boundaries(engine):
    from relay.engine import GenerationRequest

    run = engine.start(engine.prepare(engine.resolve(GenerationRequest(prompt="a fox", **SETTINGS))))
    run.run(stop=lambda: run.step_index >= 2)
    assert run.step_index == 2 and not run.done
    assert torch.isfinite(run.latents).all()
