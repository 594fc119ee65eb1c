"""Multi-node Ray on one machine: Ray's own test cluster (``ray.cluster_utils.Cluster``: a head
and worker nodes, each with its own raylet and one CPU), a staged request spread over two nodes
equal to one process, a node killed (its raylet) in the middle of a request -- the group rebuilt
on the spare node and the video equal to the undisturbed one, or, with no capacity left, a clear
failure within seconds -- and nothing orphaned: no live actor or placement group but the live
executor's. Plus the pure placement checks (what cannot be placed, and why) and the flags."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

REQUEST = dict(prompt="a lighthouse in a storm", height=32, width=32, frames=5, steps=7,
               guidance=4.0, guidance_low=3.0, shift=5.0)
SWITCH = 3  # with shift 5 the tiny T2V runs 3 high-noise then 4 low-noise steps
SEED = 11
#: Ray declares a node dead after two missed 0.5 s health checks (the default: five of 3 s).
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                   "health_check_initial_delay_ms": 0}
TAG = "relay-multinode-tag"
UNDISTURBED: dict = {}  # the staged frames of the first cluster test


# --- pure: what cannot be placed, and why ----------------------------------------------------
def test_shortfall_names_what_the_alive_nodes_lack():
    from relay.launch.ray_group import shortfall

    room = {"aaaa1111": {"CPU": 2.0, "relay-low": 1.0}, "bbbb2222": {"CPU": 1.0}}
    assert shortfall({"CPU": 1}, 2, "STRICT_PACK", room) is None
    assert shortfall({"CPU": 1}, 3, "SPREAD", room) is None
    assert shortfall({"CPU": 1, "relay-low": 0.001}, 2, "STRICT_PACK", room) is None
    packed = shortfall({"CPU": 1}, 3, "STRICT_PACK", room)
    assert "no node has room for all 3 (at most 2 on one node)" in packed and "node aaaa1111: {CPU: 2}" in packed
    assert "missing CPU (4 needed, 3 free)" in shortfall({"CPU": 1}, 4, "PACK", room)
    assert "only 2 node(s) have room for one" in shortfall({"CPU": 1}, 3, "STRICT_SPREAD", room)
    tagged = shortfall({"CPU": 1, "relay-high": 0.001}, 1, "STRICT_PACK", room)
    assert "missing relay-high (no alive node has it)" in tagged
    assert "missing GPU (no alive node has it)" in shortfall({"GPU": 1, "CPU": 1}, 1, "STRICT_PACK", room)
    assert "no alive node" in shortfall({"CPU": 1}, 1, "STRICT_PACK", {})


def test_room_leaves_out_what_live_peers_hold_but_not_broken_ones():
    from relay.launch.ray_group import RayWorkerGroup, shortfall
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    spec = WorkerSpec(model="m", layout=ParallelLayout(), device_type="cpu")
    groups: list = []
    high = RayWorkerGroup(name="high", roles=("high_noise",), spec=spec, peers=groups)
    low = RayWorkerGroup(name="low", roles=("low_noise",), spec=spec, peers=groups)
    groups += [high, low]
    nodes = [{"NodeID": "aaaa", "Alive": True, "Resources": {"CPU": 1.0, "node:10.0.0.1": 1.0, "memory": 9.0}},
             {"NodeID": "bbbb", "Alive": False, "Resources": {}}]
    high.actors, high.nodes = ["actor"], ["aaaa"]  # high holds node aaaa's one CPU
    low.nodes = ["bbbb"]  # low was on bbbb, which died
    assert low._room(nodes) == {"aaaa": {"CPU": 0.0}}
    assert "missing CPU (1 needed, 0 free)" in shortfall(low._bundle(), 1, "STRICT_PACK", low._room(nodes))
    high.nodes = ["bbbb"]  # a peer whose node died is about to let go: its reservation does not count
    assert low._room(nodes) == {"aaaa": {"CPU": 1.0}}
    tagged = RayWorkerGroup(name="low", roles=("low_noise",), spec=spec, resources=("relay-low",))
    assert tagged._bundle() == {"CPU": 1, "relay-low": 0.001}
    with pytest.raises(ValueError, match="STRICT_SPREAD"):
        RayWorkerGroup(name="x", roles=(), spec=spec, strategy="BALANCED")


def test_ray_resources_flag_is_parsed_and_checked():
    from relay.cli.flags import RAY_STRATEGIES, parse_ray_resources
    from relay.engine.errors import ValidationError
    from relay.launch.executor import ray_resources_for
    from relay.launch.ray_group import STRATEGIES

    assert RAY_STRATEGIES == STRATEGIES
    parsed = parse_ray_resources("relay, high=h100,low=a100,low=spot,accelerator_type:A6000")
    assert parsed == {"*": ("relay", "accelerator_type:A6000"), "high": ("h100",), "low": ("a100", "spot")}
    assert ray_resources_for(parsed, "low") == ("relay", "accelerator_type:A6000", "a100", "spot")
    assert ray_resources_for(None, "x") == ()
    # Ray's own names: a placement group's bundle resources and the per-node ones are not tags.
    for bad in ("high=", "=x", "a b", "CPU", "high=GPU", "relay_group_a", "node:10.0.0.1"):
        with pytest.raises(ValidationError) as caught:
            parse_ray_resources(bad)
        assert caught.value.field == "ray_resources"


def test_an_existing_cluster_is_waited_for_until_its_gpus_join():
    """Workers of a launched cluster join after the head (their weights download first): the
    executor waits for the GPUs a placement needs, up to its build timeout, on a clock of its
    own (here a counting one: no real waiting)."""
    from relay.launch.executor import wait_for_resource

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

        def sleep(self, seconds):
            self.now += seconds

    joined = iter([0, 0, 8, 8, 16])  # GPUs seen at each look: one node, then the second
    clock = Clock()
    assert wait_for_resource(lambda: next(joined), 16, timeout_s=600, what="GPUs", clock=clock, sleep=clock.sleep) == 16
    assert clock.now == 8.0  # four 2 s polls
    clock = Clock()
    assert wait_for_resource(lambda: 8, 16, timeout_s=60, what="GPUs", clock=clock, sleep=clock.sleep) == 8
    assert clock.now == 60.0  # gave up at the timeout
    assert wait_for_resource(lambda: 8, 16, timeout_s=0, what="GPUs") == 8  # a local Ray: no wait


@pytest.mark.parametrize("flags, flag", [
    (["--ray-resources", "relay"], "--ray-resources: needs --executor ray"),
    (["--executor", "ray", "--ray-resources", "high=x y"], "--ray-resources: must be NAME or GROUP=NAME"),
    (["--executor", "ray", "--placement", "staged", "--ray-resources", "fused0=x"],
     "--ray-resources: no group fused0 in this placement (groups: high, low)"),
    (["--executor", "ray", "--ray-strategy", "BALANCED"], "--ray-strategy: invalid choice"),
])
def test_cli_ray_flag_errors_exit_2_before_ray_starts(relay, tiny_models, tmp_path, flags, flag):
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", "x", "--output",
                   tmp_path / "x.npy", "--quiet", *flags)
    assert result.code == 2 and flag in result.err, result.err


# --- a Ray cluster of several nodes on this machine --------------------------------------------
class Nodes:
    """The test cluster: the head (no CPU: the driver only) and worker nodes of one CPU each."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.workers = [cluster.add_node(num_cpus=1) for _ in range(3)]

    def by_id(self, node_id: str):
        return next(n for n in self.workers if n.node_id == node_id)

    def kill(self, node_id: str) -> None:
        """Kills the node's raylet and every process of it, with no graceful drain."""
        node = self.by_id(node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)


@pytest.fixture(scope="module")
def nodes():
    import ray
    from ray._common.utils import reset_ray_address
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from relay.launch.ray_group import connect, shutdown

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False,
                                                                _system_config=FAST_NODE_DEATH))
    # The cluster is joined by its address only: a plain ray.init() elsewhere on the machine (a
    # concurrent test run) must not find it.
    try:
        with open(get_ray_address_file(None)) as f:
            if f.read().strip() == cluster.address:
                reset_ray_address()
    except OSError:
        pass
    try:
        assert connect(cluster.address) is True
        yield Nodes(cluster)
    finally:
        shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def t2v(tiny_models):
    from relay.engine.model_info import read_model_info

    return read_model_info(tiny_models["t2v"])


def _resolved(info, **overrides):
    from relay.engine.request import GenerationRequest, resolve_request

    return resolve_request(GenerationRequest(**{**REQUEST, "seed": SEED, **overrides}), info)


@pytest.fixture(scope="module")
def reference(t2v):
    """The single-process frames: the independent reference."""
    from relay.engine.loader import load_model
    from relay.engine.pipeline import Engine

    return Engine(load_model(t2v, dtype="fp32", device="cpu")).generate(_resolved(t2v))


def _executor(t2v, address, **options):
    from relay.engine.scheduler import SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec

    spec = WorkerSpec(model=str(t2v.path), layout=None, dtype="fp32", device_type="cpu", threads=1)
    placement = {k: options.pop(k) for k in ("placement", "stage_split", "layout") if k in options}
    # No periodic rebuild tries unless asked: a try in flight would hold a pending placement group.
    config = SchedulerConfig(step_timeout_s=60.0, load_timeout_s=120.0, health_period_s=0.0,
                             rebuild_retry_s=options.pop("rebuild_retry_s", 0.0))
    return Executor(plan_groups(t2v, _resolved(t2v), **placement), spec, backend="ray", config=config,
                    ray_address=address, build_timeout_s=120.0, **options)


@pytest.fixture(scope="module")
def staged(nodes, t2v):
    executor = _executor(t2v, nodes.cluster.address, placement="staged", stage_split="1:1")
    yield executor
    executor.close()


def _submit(executor, t2v, on_event=None):
    from relay.engine.stages import request_experts

    resolved = _resolved(t2v)
    return executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(t2v, resolved),
                                     on_event=on_event)


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _live_relay_actors() -> list[dict]:
    import ray

    return [a for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and (a.get("Name") or "").startswith("relay-")]


def _live_relay_placement_groups() -> list[dict]:
    import ray

    return [pg for pg in ray.util.placement_group_table().values()
            if pg["state"] != "REMOVED" and pg["name"].startswith("relay-")]


def _assert_only(executors) -> None:
    """Every live relay actor and placement group on the cluster is one of ``executors``' groups."""
    groups = [g for executor in executors for g in executor.groups if g.actors]  # a retired group has none
    live = _live_relay_actors()
    assert sorted(a["Pid"] for a in live) == sorted(pid for g in groups for pid in g.pids)
    assert {a["Address"]["NodeID"] for a in live} == {node for g in groups for node in g.nodes}
    assert sorted(pg["placement_group_id"] for pg in _live_relay_placement_groups()) == sorted(
        g.placement_group.id.hex() for g in groups)


def _actor_nodes(group) -> set[str]:
    """The Ray nodes the group's actors run on, as the cluster's actor table says."""
    pids = set(group.pids)
    return {a["Address"]["NodeID"] for a in _live_relay_actors() if a["Pid"] in pids}


class KillOnStep:
    """An ``on_event`` that, when ``step`` is reported, kills the node of ``group`` and waits for
    its rank processes to be gone before the scheduler carries on (the barrier: no sleeps)."""

    def __init__(self, nodes: Nodes, group, step: int) -> None:
        self.nodes, self.group, self.step = nodes, group, step
        self.events: list[tuple[str, dict]] = []
        self.killed = threading.Event()
        self.victim: str | None = None
        self.at: float | None = None

    def __call__(self, kind: str, data: dict) -> None:
        from relay.launch.ray_group import _alive

        self.events.append((kind, data))
        if kind == "progress" and data["step"] == self.step and not self.killed.is_set():
            (self.victim,) = set(self.group.nodes)
            pids = list(self.group.pids)
            self.nodes.kill(self.victim)
            deadline = time.monotonic() + 30
            while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not any(_alive(pid) for pid in pids)
            self.at = time.monotonic()
            self.killed.set()


def test_staged_request_spread_over_two_nodes_equals_one_process(nodes, staged, t2v, reference):
    high, low = staged.group("high"), staged.group("low")
    assert len(set(high.nodes)) == len(set(low.nodes)) == 1 and set(high.nodes) != set(low.nodes)
    assert _actor_nodes(high) == set(high.nodes) and _actor_nodes(low) == set(low.nodes)
    assert set(high.nodes) | set(low.nodes) < {n.node_id for n in nodes.workers}  # a spare node left
    events = []
    frames = _submit(staged, t2v, lambda kind, data: events.append((kind, data))).result(timeout=300)
    assert _max_diff(frames, reference) <= 1e-5
    steps = [(data["step"], data["group"]) for kind, data in events if kind == "progress"]
    assert steps == [(1, "high"), (2, "high"), (3, "high"), (4, "low"), (5, "low"), (6, "low"), (7, "low")]
    UNDISTURBED["frames"] = frames
    _assert_only([staged])


def test_node_lost_mid_request_rebuilds_its_group_on_the_spare_node(nodes, staged, t2v, reference):
    high, low = staged.group("high"), staged.group("low")
    assert "frames" in UNDISTURBED, "runs after the undisturbed staged request"
    (spare,) = {n.node_id for n in nodes.workers} - set(high.nodes) - set(low.nodes)
    high_before, old_pg = list(high.pids), low.placement_group.id.hex()
    # At the first low-noise step two more are in flight; the fourth is asked of a dead rank.
    kill = KillOnStep(nodes, low, SWITCH + 1)
    ticket = _submit(staged, t2v, kill)
    frames = ticket.result(timeout=300)
    assert kill.killed.is_set()
    assert np.array_equal(frames, UNDISTURBED["frames"])  # bit-identical to the undisturbed run
    assert _max_diff(frames, reference) <= 1e-5
    assert ticket.attempts == 1 and staged.scheduler.restarts == {"high": 0, "low": 1}
    retries = [data for kind, data in kill.events if kind == "retry"]
    assert len(retries) == 1 and retries[0]["group"] == "low"
    assert "a worker died during advance" in retries[0]["error"]
    assert f"the Ray cluster lost node {kill.victim[:8]}" in retries[0]["error"]
    # The low-noise steps stopped short of the end and went on from the last checkpoint.
    retry = next(i for i, (kind, _) in enumerate(kill.events) if kind == "retry")
    before = [data["step"] for kind, data in kill.events[:retry] if kind == "progress"]
    after = [data["step"] for kind, data in kill.events[retry:] if kind == "progress"]
    assert before[:SWITCH + 1] == [1, 2, 3, 4] and before[-1] < 7
    assert after == list(range(before[-1] + 1, 8))
    # The low group is now on the spare node, the high group untouched; nothing orphaned.
    assert set(low.nodes) == _actor_nodes(low) == {spare}
    assert high.pids == high_before and _actor_nodes(high) == set(high.nodes)
    table = {pg["placement_group_id"]: pg for pg in __import__("ray").util.placement_group_table().values()}
    assert table[old_pg]["state"] == "REMOVED"
    _assert_only([staged])


def test_node_lost_with_no_capacity_left_fails_the_request_clearly(nodes, staged, t2v, reference):
    from relay.engine.scheduler import RequestFailed

    high, low = staged.group("high"), staged.group("low")
    assert staged.scheduler.restarts["low"] == 1, "runs after the rebuild on the spare node"
    assert {n.node_id for n in nodes.workers} == set(high.nodes) | set(low.nodes)  # no spare left
    kill = KillOnStep(nodes, low, SWITCH + 1)
    ticket = _submit(staged, t2v, kill)
    with pytest.raises(RequestFailed, match="no live worker group runs stage low_noise") as failed:
        ticket.result(timeout=120)
    # The request's own error says why: the low group could not be placed again.
    assert "group low retired: rebuild failed: group low cannot be placed" in str(failed.value)
    assert f"the cluster lost the node this group ran on: node {kill.victim[:8]}" in str(failed.value)
    failed_after = time.monotonic() - kill.at
    assert failed_after < 20, f"the request failed {failed_after:.1f}s after the node was lost"
    rebuild = [data["error"] for kind, data in kill.events if kind == "retry" and "rebuild failed" in data.get("error", "")]
    assert len(rebuild) == 1, kill.events
    message = rebuild[0]
    assert "group low cannot be placed: the Ray cluster's alive nodes cannot hold 1 x {CPU: 1} (STRICT_PACK" in message
    assert "missing CPU (1 needed, 0 free)" in message
    assert f"the cluster lost the node this group ran on: node {kill.victim[:8]}" in message
    # The failed rebuild left nothing behind; the high group still serves what it can.
    assert not low.actors and low.placement_group is None
    assert high.ping(timeout_s=30) == high.pids
    with pytest.raises(RequestFailed, match="no live worker group runs stage"):
        _submit(staged, t2v)
    _assert_only([staged])
    staged.close()
    assert not _live_relay_actors() and not _live_relay_placement_groups()
    # The process keeps working: a node tagged for Relay joins and takes the next group, which
    # avoids the untagged node left free.
    tagged = nodes.cluster.add_node(num_cpus=1, resources={TAG: 1})
    nodes.workers.append(tagged)
    with _executor(t2v, nodes.cluster.address, ray_resources={"*": (TAG,)}) as fused:
        assert fused.group("fused0").nodes == [tagged.node_id] and _actor_nodes(fused.group("fused0")) == {tagged.node_id}
        assert _max_diff(_submit(fused, t2v).result(timeout=300), reference) <= 1e-5
        _assert_only([fused])
    assert not _live_relay_actors() and not _live_relay_placement_groups()


def test_one_group_spread_over_two_nodes_equals_one_process(nodes, t2v, reference):
    """``--ray-strategy STRICT_SPREAD``: a 2-rank Ulysses group with a rank on each of two nodes
    (its gloo group spans the nodes) makes the single-process video."""
    from relay.parallel.layout import ParallelLayout

    while len(nodes.workers) < 2:  # the tests above leave two one-CPU nodes; make sure
        nodes.workers.append(nodes.cluster.add_node(num_cpus=1))
    with _executor(t2v, nodes.cluster.address, layout=ParallelLayout(ulysses_degree=2),
                   ray_strategy="STRICT_SPREAD") as spread:
        group = spread.group("fused0")
        assert len(group.nodes) == 2 and len(set(group.nodes)) == 2
        assert {a["Address"]["NodeID"] for a in _live_relay_actors()} == set(group.nodes)
        assert _max_diff(_submit(spread, t2v).result(timeout=300), reference) <= 1e-5
        _assert_only([spread])
    assert not _live_relay_actors() and not _live_relay_placement_groups()


def test_a_group_retired_for_want_of_a_node_serves_again_when_one_joins(nodes, t2v, reference):
    """``rebuild_retry_s``: the low group, retired because no node was left for it, keeps trying
    to build; a node joins, the group is built there and serves the next request, equal to the
    undisturbed staged run; the failed tries leave no placement group behind."""
    import logging

    from relay.engine.scheduler import RequestFailed

    assert "frames" in UNDISTURBED, "runs after the undisturbed staged request"
    while len(nodes.workers) < 2:
        nodes.workers.append(nodes.cluster.add_node(num_cpus=1))
    still = threading.Event()  # a periodic try that found no room (the barrier before a node joins)

    class Tries(logging.Handler):
        def emit(self, record):
            if "still cannot be built" in record.getMessage():
                still.set()

    handler, logger = Tries(), logging.getLogger("relay.engine.scheduler")
    level = logger.level
    logger.setLevel(logging.INFO)  # the line of a failed try is an INFO one
    logger.addHandler(handler)
    try:
        with _executor(t2v, nodes.cluster.address, placement="staged", stage_split="1:1",
                       rebuild_retry_s=0.5) as staged:
            high, low = staged.group("high"), staged.group("low")
            assert {n.node_id for n in nodes.workers} == set(high.nodes) | set(low.nodes)  # no spare
            kill = KillOnStep(nodes, low, SWITCH + 1)
            with pytest.raises(RequestFailed, match="group low retired: rebuild failed: group low cannot be placed"):
                _submit(staged, t2v, kill).result(timeout=120)
            assert still.wait(60)
            assert "low" in staged.scheduler.retired
            joined = nodes.cluster.add_node(num_cpus=1)
            nodes.workers.append(joined)
            assert staged.scheduler.wait_serving("low", timeout_s=60)
            assert low.nodes == [joined.node_id] and _actor_nodes(low) == {joined.node_id}
            ticket = _submit(staged, t2v)
            assert np.array_equal(ticket.result(timeout=300), UNDISTURBED["frames"]) and ticket.attempts == 0
            _assert_only([staged])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not _live_relay_actors() and not _live_relay_placement_groups()


def test_shutting_down_a_group_that_waits_for_room_gives_up_its_build_at_once(nodes, t2v):
    """A group whose nodes could hold it but whose resources another placement holds waits up to
    its build timeout; shutting it down (what closing an executor does to a group being rebuilt
    in the background) makes the build give up at its next poll, not after the timeout, and
    leaves no placement group or actor behind."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from relay.engine.tickets import GroupFailure
    from relay.launch.ray_group import RayWorkerGroup
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    free = int(ray.available_resources().get("CPU", 0))
    holder = placement_group([{"CPU": 1}] * free, strategy="SPREAD") if free else None
    if holder is not None:
        assert holder.wait(60)  # every free CPU is held by someone else: the group must wait
    spec = WorkerSpec(model=str(t2v.path), layout=ParallelLayout(), dtype="fp32", device_type="cpu", threads=1)
    group = RayWorkerGroup(name="waiting", roles=("encode", "high_noise", "low_noise", "decode"), spec=spec,
                           build_timeout_s=600.0)
    outcome: dict = {}

    def build():
        began = time.monotonic()
        try:
            group.build()
        except GroupFailure as exc:
            outcome["error"] = str(exc)
        outcome["seconds"] = time.monotonic() - began

    builder = threading.Thread(target=build)
    try:
        builder.start()
        deadline = time.monotonic() + 30
        while group.placement_group is None and time.monotonic() < deadline:  # the build is waiting
            time.sleep(0.02)
        assert group.placement_group is not None
        group.shutdown()  # returns once the build has given up and torn down
        builder.join(30)
        assert not builder.is_alive()
        assert "is shut down" in outcome["error"] and outcome["seconds"] < 60, outcome
        with pytest.raises(GroupFailure, match="is shut down"):
            group.build()  # and no new build starts
    finally:
        builder.join(30)
        if holder is not None:
            remove_placement_group(holder)
    assert not _live_relay_actors() and not _live_relay_placement_groups()
