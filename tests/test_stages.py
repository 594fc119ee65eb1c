"""Stage sizing and placement validation (no processes), and the stage scheduler on a local Ray
cluster: staged and fused output equal the single-process output, the two stages overlap, and
killed or hung workers cost a group rebuild, never a request or a wrong frame."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

REQUEST = dict(prompt="a lighthouse in a storm", height=32, width=32, frames=5, steps=6,
               guidance=4.0, guidance_low=3.0, shift=5.0)
SWITCH = 3  # with shift 5 the tiny T2V runs 3 high-noise then 3 low-noise steps
SEEDS = (11, 12, 13)


# --- sizing and placement (pure) ------------------------------------------------------------
def test_expert_step_counts_match_the_wan22_reference_split():
    from relay.engine.stages import expert_step_counts

    assert expert_step_counts(40, 12.0, 0.875) == {"high_noise": 26, "low_noise": 14}
    assert expert_step_counts(40, 5.0, 0.900) == {"high_noise": 15, "low_noise": 25}
    assert expert_step_counts(50, 5.0, None) == {"dense": 50}


def test_propose_split_balances_stage_times_and_says_why():
    from relay.engine.stages import propose_split

    t2v = propose_split(8, 26, 14)
    assert (t2v.high_devices, t2v.low_devices) == (5, 3) and "26 high-noise vs 14 low-noise" in t2v.reason
    i2v = propose_split(8, 15, 25)
    assert (i2v.high_devices, i2v.low_devices) == (3, 5) and i2v.balance == pytest.approx(1.0)
    # Only sizes that divide A14B's 40 heads: 5 is allowed, 3 is not -> 4:4 for T2V.
    assert propose_split(8, 26, 14, allowed=lambda n: 40 % n == 0).as_flag() in ("4:4", "5:3")
    # A cost model with sub-linear scaling moves devices to the slower stage less eagerly.
    flat = propose_split(4, 26, 14, step_time=lambda n: 1.0 / n ** 0.5)
    assert flat.period_s == pytest.approx(max(flat.high_s, flat.low_s))
    with pytest.raises(ValueError, match="at least 2 devices"):
        propose_split(1, 26, 14)


def test_segments_split_a_schedule_at_the_boundary():
    from relay.engine.stages import Segment, segments

    assert segments(["high_noise"] * 3 + ["low_noise"] * 2) == [Segment("high_noise", 0, 3),
                                                                  Segment("low_noise", 3, 5)]


def _resolved(info, **overrides):
    from relay.engine.request import GenerationRequest, resolve_request

    return resolve_request(GenerationRequest(**{**REQUEST, "seed": 1, **overrides}), info)


def test_placement_validation_names_the_flag(tiny_models):
    from relay.engine.errors import ValidationError
    from relay.engine.model_info import read_model_info
    from relay.launch.placement import plan_groups

    t2v, ti2v = read_model_info(tiny_models["t2v"]), read_model_info(tiny_models["ti2v"])
    staged = plan_groups(t2v, _resolved(t2v), placement="staged", devices=4, encode_on="own", decode_on="own")
    assert [g.name for g in staged.groups] == ["high", "low", "aux"]
    assert staged.groups[2].roles == ("encode", "decode") and staged.devices == 5
    cases = [
        (dict(placement="staged"), ti2v, "placement"),
        (dict(placement="staged", stage_split="0:2"), t2v, "stage_split"),
        (dict(placement="staged", stage_split="2"), t2v, "stage_split"),
        (dict(placement="staged", stage_split="2:1", high_layout="ulysses=4"), t2v, "high_layout"),
        (dict(placement="staged", stage_split="3:1", high_layout="ulysses=3"), t2v, "high_layout"),
        (dict(placement="staged", encode_on="gpu0"), t2v, "encode_on"),
        (dict(placement="fused", replicas=0), t2v, "replicas"),
        (dict(placement="pipelined"), t2v, "placement"),
    ]
    for kwargs, info, field in cases:
        with pytest.raises(ValidationError) as caught:
            plan_groups(info, _resolved(info) if info is t2v else _resolved(info, guidance_low=None), **kwargs)
        assert caught.value.field == field, (kwargs, caught.value)


@pytest.mark.parametrize("flags, flag", [
    (["--executor", "torchrun", "--placement", "staged"], "--executor: torchrun runs one group"),
    (["--executor", "torchrun", "--replicas", "2"], "--executor: torchrun runs one group"),
    (["--ray-address", "auto"], "--ray-address: needs --executor ray"),
    (["--placement", "staged", "--ulysses", "2"], "--placement: staged groups take"),
    (["--layout", "ulysses=2", "--ulysses", "2", "--nproc", "2"], "--layout: --layout replaces --ulysses"),
    (["--executor", "ray", "--placement", "staged", "--ulysses", "2"], "--placement: staged groups take"),
    (["--executor", "ray", "--placement", "staged", "--stage-split", "1:x"], "--stage-split: must be HIGH:LOW"),
    (["--executor", "ray", "--checkpoint-every", "0"], "--checkpoint-every: must be at least 1"),
    (["--executor", "ray", "--step-timeout", "0"], "--step-timeout: must be positive"),
])
def test_cli_placement_errors_exit_2_before_ray_starts(relay, tiny_models, tmp_path, flags, flag):
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", "x", "--output",
                   tmp_path / "x.npy", "--quiet", *flags)
    assert result.code == 2 and flag in result.err, result.err
    assert not (tmp_path / "x.npy").exists()


# --- the scheduler on local Ray ---------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    from relay.launch.ray_group import connect, shutdown

    connect(num_cpus=16)
    yield
    shutdown()


@pytest.fixture(scope="module")
def t2v(tiny_models):
    from relay.engine.model_info import read_model_info

    return read_model_info(tiny_models["t2v"])


@pytest.fixture(scope="module")
def references(t2v):
    """Single-process frames per seed: the independent reference."""
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    engine = Engine(load_model(t2v, dtype="fp32", device="cpu"))
    return {seed: engine.generate(_resolved(t2v, seed=seed)) for seed in SEEDS}


def _executor(t2v, backend="ray", **placement):
    from relay.engine.scheduler import SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec

    spec = WorkerSpec(model=str(t2v.path), layout=None, dtype="fp32", device_type="cpu")
    config = placement.pop("config", SchedulerConfig(step_timeout_s=60.0, load_timeout_s=120.0))
    return Executor(plan_groups(t2v, _resolved(t2v), **placement), spec, backend=backend, config=config)


@pytest.fixture(scope="module")
def staged(ray_session, t2v):
    executor = _executor(t2v, placement="staged", stage_split="1:1")
    yield executor
    executor.close()


@pytest.fixture(scope="module")
def undisturbed(staged, t2v):
    """Frames of undisturbed staged runs per seed: what a recovered request must equal bit for bit
    (the single-process reference may differ in the last bit: another thread count)."""
    tickets = {seed: _submit(staged, t2v, seed) for seed in SEEDS}
    return {seed: ticket.result(timeout=600) for seed, ticket in tickets.items()}


def _submit(executor, t2v, seed, events=None):
    from relay.engine.stages import request_experts

    resolved = _resolved(t2v, seed=seed)
    on_event = (lambda kind, data: events.append((kind, data))) if events is not None else None
    return executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(t2v, resolved),
                                     on_event=on_event)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_staged_output_equals_single_process(staged, t2v, references):
    from relay.engine.stages import request_experts

    experts = request_experts(t2v, _resolved(t2v))
    assert experts[SWITCH - 1] == "high_noise" and experts[SWITCH] == "low_noise"  # crosses the boundary
    events = []
    frames = _submit(staged, t2v, SEEDS[0], events).result(timeout=300)
    assert _max_diff(frames, references[SEEDS[0]]) <= 1e-5
    groups = [(data["step"], data["group"]) for kind, data in events if kind == "progress"]
    assert groups == [(1, "high"), (2, "high"), (3, "high"), (4, "low"), (5, "low"), (6, "low")]
    assert [kind for kind, _ in events][-1] == "done"


def test_fused_group_of_two_ranks_equals_single_process(ray_session, t2v, references):
    from relay.parallel.layout import ParallelLayout

    with _executor(t2v, placement="fused", layout=ParallelLayout(ulysses_degree=2)) as fused:
        frames = _submit(fused, t2v, SEEDS[1]).result(timeout=300)
    assert _max_diff(frames, references[SEEDS[1]]) <= 1e-5


def test_stages_overlap_across_requests(staged, t2v, references):
    tickets = [_submit(staged, t2v, SEEDS[i % 2]) for i in range(6)]
    for i, ticket in enumerate(tickets):
        assert _max_diff(ticket.result(timeout=600), references[SEEDS[i % 2]]) <= 1e-5
    ids = {ticket.request_id for ticket in tickets}
    trace = [e for e in staged.scheduler.trace if e.request in ids and e.kind != "restart"]  # prepare, step, decode
    high = [e for e in trace if e.group == "high"]
    low = [e for e in trace if e.group == "low"]
    overlapping = {(h.request, l.request) for h in high for l in low
                   if min(h.end, l.end) > max(h.start, l.start)}
    # Request i's low-noise steps ran while request i+1's high-noise steps did.
    assert sum(1 for h, l in overlapping if h == l + 1) >= 3, sorted(overlapping)


def _restarts(executor) -> int:
    return sum(executor.scheduler.restarts.values())


@pytest.mark.parametrize("group, fault", [
    ("high", {"action": "exit", "method": "advance", "at_step": 1}),  # mid high-noise stage
    ("low", {"action": "exit", "method": "advance", "at_step": SWITCH + 1}),  # mid low-noise stage
    ("low", {"action": "exit", "method": "begin"}),  # after the hand-off, before the pick-up
], ids=["mid-high", "mid-low", "at-pickup"])
def test_killed_worker_costs_a_restart_not_the_request(staged, t2v, references, undisturbed, group, fault):
    before = _restarts(staged)
    staged.group(group).arm_fault({**fault, "seed": SEEDS[0]})
    victim, bystander = _submit(staged, t2v, SEEDS[0]), _submit(staged, t2v, SEEDS[2])
    assert np.array_equal(victim.result(timeout=600), undisturbed[SEEDS[0]])  # bit-identical
    assert _max_diff(undisturbed[SEEDS[0]], references[SEEDS[0]]) <= 1e-5
    assert np.array_equal(bystander.result(timeout=600), undisturbed[SEEDS[2]])
    assert _restarts(staged) == before + 1 and victim.attempts == 1 and bystander.attempts == 0


def test_hung_worker_is_caught_by_the_watchdog(staged, t2v, undisturbed):
    scheduler = staged.scheduler
    saved = scheduler.config
    scheduler.config = replace(saved, step_timeout_s=6.0)
    try:
        before = _restarts(staged)
        staged.group("high").arm_fault({"action": "hang", "method": "advance", "at_step": 2, "seed": SEEDS[1]})
        events = []
        frames = _submit(staged, t2v, SEEDS[1], events).result(timeout=600)
    finally:
        scheduler.config = saved
    assert np.array_equal(frames, undisturbed[SEEDS[1]])
    assert _restarts(staged) == before + 1
    assert any(kind == "retry" and "watchdog" in data["error"] for kind, data in events)


def test_request_that_keeps_killing_its_group_fails_clearly(staged, t2v, references):
    from relay.engine.scheduler import RequestFailed

    poison_seed = 99
    staged.group("high").arm_fault({"action": "exit", "method": "advance", "at_step": 1, "seed": poison_seed},
                                   persistent=True)
    try:
        poison, other = _submit(staged, t2v, poison_seed), _submit(staged, t2v, SEEDS[2])
        with pytest.raises(RequestFailed, match="giving up after 2 retries"):
            poison.result(timeout=600)
        assert poison.attempts == 3
        assert _max_diff(other.result(timeout=600), references[SEEDS[2]]) <= 1e-5
    finally:
        staged.group("high").arm_fault(None, persistent=True)


def _live_relay_actors() -> list[dict]:
    import ray

    return [a for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and (a.get("Name") or "").startswith("relay-")]


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _rank_actor_processes(raylet: int) -> set[int]:
    """``RankActor`` processes started by this session's raylet (other Ray sessions on the
    machine, e.g. a concurrent test run, are not ours to count)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RankActor" in (entry / "cmdline").read_bytes() and _parent(int(entry.name)) == raylet:
                    pids.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return pids


@pytest.mark.slow  # a soak: ten rebuilds (a minute); one kill-and-rebuild runs in the default suite
def test_ten_kill_restart_cycles_leak_no_actor_or_process(staged, t2v, references):
    import ray

    from relay.launch.ray_group import _alive

    before = _restarts(staged)
    killed = []
    for cycle in range(10):
        group = staged.group("low" if cycle % 2 else "high")
        killed.extend(group.pids)
        group.arm_fault({"action": "exit", "method": "begin" if cycle % 2 else "prepare"})
        assert _max_diff(_submit(staged, t2v, SEEDS[0]).result(timeout=600), references[SEEDS[0]]) <= 1e-5
    assert _restarts(staged) == before + 10
    live = _live_relay_actors()
    assert len(live) == sum(g.size for g in staged.groups)
    assert {a["Pid"] for a in live} == {pid for g in staged.groups for pid in g.pids}
    assert not any(_alive(pid) for pid in killed)
    raylet = _parent(staged.groups[0].pids[0])  # actor processes are the raylet's children
    assert _rank_actor_processes(raylet) == {pid for g in staged.groups for pid in g.pids}
    created = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
    assert len(created) == len(staged.groups)


def test_group_restart_budget_retires_a_group_and_fails_its_requests_clearly(ray_session, t2v):
    from relay.engine.scheduler import RequestFailed, SchedulerConfig

    config = SchedulerConfig(step_timeout_s=60.0, max_group_restarts=1, max_request_retries=5)
    with _executor(t2v, placement="fused", config=config) as fused:
        fused.group("fused0").arm_fault({"action": "exit", "method": "advance", "at_step": 1}, persistent=True)
        first = _submit(fused, t2v, SEEDS[0])
        retired = r"no live worker group runs stage.* \(group fused0 retired: it failed 2 times \(max_group_restarts 1\)\)"
        with pytest.raises(RequestFailed, match=retired):
            first.result(timeout=600)
        assert fused.scheduler.restarts["fused0"] == 2
        with pytest.raises(RequestFailed, match=retired):
            _submit(fused, t2v, SEEDS[1])


def test_priority_then_fifo_and_cancel_at_a_step_boundary(staged, t2v, undisturbed):
    from relay.engine.scheduler import RequestCancelled

    scheduler = staged.scheduler
    saved = scheduler.config
    scheduler.config = replace(saved, overlap=False)  # one request in the pipeline at a time
    started = []
    try:
        events = []
        first = _submit(staged, t2v, SEEDS[0], events)
        # Queued behind it: priority first, then arrival order.
        later = [staged.scheduler.submit(
            _resolved(t2v, seed=seed).to_dict(with_image=True), priority=priority,
            experts=_experts(t2v), on_event=lambda kind, data, s=seed: kind == "started" and started.append(s))
            for seed, priority in ((SEEDS[1], 0), (SEEDS[2], 0), (98, 3), (99, 5))]
        assert [scheduler.position(t) for t in later] == [2, 3, 1, 0]
        scheduler.cancel(later[3])  # a queued request is cancelled at once and never starts
        with pytest.raises(RequestCancelled):
            later[3].result(timeout=10)
        # Cancel the running request after its first step: it stops at the next step boundary.
        while not any(kind == "progress" for kind, _ in list(events)):
            first._done.wait(0.05)
        scheduler.cancel(first)
        with pytest.raises(RequestCancelled):
            first.result(timeout=300)
        assert first.state is None or first.state.step_index < 6
        later[2].result(timeout=300)
        assert np.array_equal(later[0].result(timeout=300), undisturbed[SEEDS[1]])
        assert np.array_equal(later[1].result(timeout=300), undisturbed[SEEDS[2]])
    finally:
        scheduler.config = saved
    assert started == [98, SEEDS[1], SEEDS[2]]


def _experts(t2v):
    from relay.engine.stages import request_experts

    return request_experts(t2v, _resolved(t2v))


def test_encode_and_decode_on_their_own_device(ray_session, t2v, references):
    with _executor(t2v, placement="staged", stage_split="1:1", encode_on="own", decode_on="own") as three:
        assert [(g.name, g.roles) for g in three.groups] == [
            ("high", ("high_noise",)), ("low", ("low_noise",)), ("aux", ("encode", "decode"))]
        events = []
        frames = _submit(three, t2v, SEEDS[0], events).result(timeout=300)
    assert _max_diff(frames, references[SEEDS[0]]) <= 1e-5
    stages = [(data["stage"], data["group"]) for kind, data in events if kind == "stage"]
    assert stages == [("encode", "aux"), ("high_noise", "high"), ("low_noise", "low"), ("decode", "aux")]


def test_relay_generate_on_ray_staged_equals_single_process(relay, ray_session, tiny_models, references, tmp_path):
    out = tmp_path / "staged.npy"
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", REQUEST["prompt"], "--height", 32,
                   "--width", 32, "--frames", 5, "--steps", 6, "--guidance", 4, "--guidance-low", 3, "--shift", 5,
                   "--seed", SEEDS[0], "--dtype", "fp32", "--device", "cpu", "--executor", "ray",
                   "--placement", "staged", "--output", out, "--checkpoint-dir", tmp_path / "ck",
                   "--checkpoint-at", SWITCH)
    assert result.code == 0, result.err
    assert "placement staged: 3 high-noise vs 3 low-noise steps" in result.err
    assert _max_diff(np.load(out), references[SEEDS[0]]) <= 1e-5
    from relay.engine.state import DenoiseState

    snapshot = DenoiseState.load(tmp_path / "ck" / f"step-{SWITCH:04d}.pt")  # the hand-off state
    assert snapshot.step_index == SWITCH and snapshot.next_expert == "low_noise"


def test_closing_with_requests_in_flight_cancels_them_without_rebuilding(ray_session, t2v):
    from relay.engine.scheduler import RequestCancelled

    executor = _executor(t2v, placement="fused")
    events = []
    running = _submit(executor, t2v, SEEDS[0], events)
    waiting = _submit(executor, t2v, SEEDS[1])
    while not any(kind == "progress" for kind, _ in list(events)):
        running._done.wait(0.05)
    executor.close()
    for ticket in (running, waiting):
        with pytest.raises(RequestCancelled):
            ticket.result(timeout=120)
    assert executor.scheduler.restarts == {"fused0": 0}
    assert not executor.group("fused0").actors
