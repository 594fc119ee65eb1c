"""Worker health between requests and out-of-memory errors (issue 18).

* A worker of an idle group frozen from outside (SIGSTOP) is found by the idle-group health
  check and its group rebuilt within the health period plus timeout; no stopped process is left
  and the next request completes, equal to an undisturbed run, without a watchdog wait.
* A rank whose allocator fails mid-step (the ``oom`` fault really asks it for more memory than
  the machine has) fails its request at once with a message naming size, frames and layout and
  what may fit; nothing is retried; a 2-rank group is rebuilt once (its peer sits in a
  collective), a 1-rank group is kept; the next request completes.
* A rank that runs out of memory while loading fails the build with the load advice.
* A group that cannot be rebuilt (no room left) retires, its requests failing with the reason;
  it tries again every ``rebuild_retry_s`` and serves once it builds (never with 0, nor for a
  backend whose ranks cannot be started again).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from test_faults import _alive, _stopped

SETTINGS = dict(prompt="a lantern in the fog", height=32, width=32, frames=5, steps=6, seed=11,
                guidance=4.0, guidance_low=3.0, shift=5.0)
PERIOD, TIMEOUT = 1.0, 1.0


@pytest.fixture(scope="module")
def t2v(tiny_models):
    from relay.engine.model_info import read_model_info

    return read_model_info(tiny_models["t2v"])


def _executor(t2v, backend, *, ranks=2, health_period_s=0.0, setup_fault=None):
    from relay.engine.tickets import SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    layout = ParallelLayout(ulysses_degree=ranks)
    # A step watchdog far longer than any test: a test that passes never waited for it.
    config = SchedulerConfig(step_timeout_s=300.0, load_timeout_s=300.0, health_period_s=health_period_s,
                             health_timeout_s=TIMEOUT)
    spec = WorkerSpec(model=str(t2v.path), layout=layout, dtype="fp32", device_type="cpu", timeout_s=300.0,
                      setup_fault=setup_fault)
    return Executor(plan_groups(t2v, None, layout=layout), spec, backend=backend, config=config)


def _submit(executor, t2v, **overrides):
    from relay.engine.request import GenerationRequest, resolve_request
    from relay.engine.stages import request_experts

    resolved = resolve_request(GenerationRequest(**dict(SETTINGS, **overrides)), t2v)
    events = []
    ticket = executor.scheduler.submit(resolved.to_dict(with_image=True), experts=request_experts(t2v, resolved),
                                       on_event=lambda kind, data: events.append((time.monotonic(), kind, data)))
    return ticket, events


def test_a_frozen_worker_of_an_idle_group_is_replaced_before_the_next_request(t2v):
    with _executor(t2v, "mp", health_period_s=PERIOD) as executor:
        group = executor.groups[0]
        ticket, _ = _submit(executor, t2v)
        undisturbed = ticket.result(timeout=300)
        victim = group.pids[1]
        os.kill(victim, signal.SIGSTOP)
        frozen = time.perf_counter() - executor.scheduler._epoch
        deadline = time.monotonic() + 120  # found, then rebuilt: the trace entry ends the rebuild
        while not any(e.kind == "restart" for e in executor.scheduler.trace) and time.monotonic() < deadline:
            time.sleep(0.05)
        restarts = [e for e in executor.scheduler.trace if e.kind == "restart"]
        assert len(restarts) == 1 and executor.scheduler.health[group.name]["failures"] == 1
        # Found within one period plus the timeout (and scheduling slack), then rebuilt.
        assert restarts[0].start - frozen < PERIOD + TIMEOUT + 1.0, restarts[0].start - frozen
        assert group.builds == 2 and victim not in group.pids
        assert not _alive(victim) and not _stopped(victim), "the frozen rank outlived the rebuild"
        started = time.monotonic()
        ticket, events = _submit(executor, t2v)
        frames = ticket.result(timeout=300)
        assert np.array_equal(frames, undisturbed)
        assert ticket.attempts == 0 and not [e for e in events if e[1] == "retry"]
        assert time.monotonic() - started < 60  # no 300 s watchdog was waited out
        assert executor.scheduler.health[group.name]["checks"] >= 1


def test_health_checks_leave_a_healthy_idle_group_alone(t2v):
    with _executor(t2v, "mp", ranks=1, health_period_s=0.2) as executor:
        group = executor.groups[0]
        pids = list(group.pids)
        deadline = time.monotonic() + 30
        while executor.scheduler.health[group.name]["checks"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = dict(executor.scheduler.health[group.name])
        assert health["checks"] >= 3 and health["failures"] == 0
        assert group.pids == pids and executor.scheduler.restarts[group.name] == 0
        ticket, _ = _submit(executor, t2v)
        assert ticket.result(timeout=300).shape == (5, 32, 32, 3)


def _fails_fast_with_the_message(executor, t2v, *, rank, layout_words):
    from relay.engine.tickets import RequestFailed

    group = executor.groups[0]
    group.arm_fault({"action": "oom", "method": "advance", "at_step": 3}, rank=rank)
    ticket, events = _submit(executor, t2v)
    with pytest.raises(RequestFailed) as caught:
        ticket.result(timeout=120)
    message = str(caught.value)
    third = next(t for t, kind, data in events if kind == "progress" and data["step"] == 3)
    failed = next(t for t, kind, _ in events if kind == "failed")
    assert failed - third < 2.0, f"the failure took {failed - third:.1f}s after the last good step"
    assert f"out of memory on rank {rank} (cpu" in message and "while denoising" in message
    assert "can't allocate memory" in message
    assert "32x32, 5 frames" in message and layout_words in message
    assert "not retried" in message and "--fsdp" in message and "--offload" in message
    assert ticket.attempts == 0 and not [e for e in events if e[1] == "retry"]
    return ticket


def test_out_of_memory_on_one_rank_of_two_fails_at_once_and_rebuilds_the_group_once(t2v):
    with _executor(t2v, "mp") as executor:
        group = executor.groups[0]
        ticket, _ = _submit(executor, t2v)
        undisturbed = ticket.result(timeout=300)
        old = list(group.pids)
        _fails_fast_with_the_message(executor, t2v, rank=1, layout_words="ulysses=2")
        deadline = time.monotonic() + 60  # the rebuild follows the failure on the group's thread
        while not any(e.kind == "restart" for e in executor.scheduler.trace) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert executor.scheduler.restarts[group.name] == 1 and group.builds == 2
        assert not any(_alive(pid) for pid in old)
        ticket, events = _submit(executor, t2v)
        assert np.array_equal(ticket.result(timeout=300), undisturbed)
        assert executor.scheduler.restarts[group.name] == 1 and ticket.attempts == 0


@pytest.mark.parametrize("backend", ["inprocess", "mp"])
def test_out_of_memory_on_a_one_rank_group_keeps_the_group(t2v, backend):
    with _executor(t2v, backend, ranks=1) as executor:
        group = executor.groups[0]
        ticket, _ = _submit(executor, t2v)
        undisturbed = ticket.result(timeout=300)
        _fails_fast_with_the_message(executor, t2v, rank=0, layout_words="1 rank)")
        group.arm_fault(None)
        ticket, _ = _submit(executor, t2v)
        assert np.array_equal(ticket.result(timeout=300), undisturbed)
        assert executor.scheduler.restarts[group.name] == 0 and group.builds == 1


@pytest.mark.parametrize("backend, rank", [("inprocess", 0), ("mp", 1)])
def test_out_of_memory_while_loading_fails_the_build_with_the_load_advice(t2v, backend, rank):
    from relay.engine.tickets import GroupOutOfMemory

    began = time.monotonic()
    with pytest.raises(GroupOutOfMemory) as caught:
        _executor(t2v, backend, ranks=1 if backend == "inprocess" else 2,
                  setup_fault={"action": "oom", "rank": rank})
    message = str(caught.value)
    assert f"out of memory on rank {rank} (cpu" in message and "while loading the model" in message
    assert "Out of host memory while loading" in message and "--offload" in message
    assert "--text-encoder cpu" in message
    assert time.monotonic() - began < 120


def test_the_oom_fault_is_off_unless_armed(t2v):
    """Without an armed fault the same settings run (the fault hook costs nothing)."""
    from relay.launch.worker import FAULT_ACTIONS

    assert "oom" in FAULT_ACTIONS
    with _executor(t2v, "inprocess", ranks=1) as executor:
        ticket, events = _submit(executor, t2v)
        assert ticket.result(timeout=300).shape == (5, 32, 32, 3)
        assert not [e for e in events if e[1] in ("retry", "failed")]


def test_health_flags_are_checked_before_torch(relay):
    for flag, value in (("--health-period", "-1"), ("--health-timeout", "0"), ("--health-period", "inf"),
                        ("--rebuild-retry", "-1"), ("--rebuild-retry", "nan"), ("--rebuild-retry", "inf")):
        result = relay("generate", "--prompt", "x", "--output", "x.npy", flag, value)
        assert result.code == 2 and f"error: {flag}:" in result.err, result.err
    from relay.engine.tickets import SchedulerConfig

    for value in (-1.0, float("nan"), float("inf")):  # the API refuses what the flag refuses
        with pytest.raises(ValueError, match="rebuild_retry_s"):
            SchedulerConfig(rebuild_retry_s=value)


@pytest.mark.parametrize("load_timeout_s, builds", [(60.0, True), (2.0, False)])
def test_a_slow_loading_rank_is_waited_for_under_the_load_timeout_not_the_step_timeout(t2v, load_timeout_s, builds):
    """Rank 1 loads 6 s after rank 0; the step collectives time out after 2 s. With a load
    timeout of 60 s the group builds and serves (the step timeout applies once all have loaded);
    with the load timeout as short as the step one, the first collective aborts the group."""
    from dataclasses import replace

    from relay.engine.tickets import GroupFailure, SchedulerConfig
    from relay.launch.executor import Executor
    from relay.launch.placement import plan_groups
    from relay.launch.worker import WorkerSpec
    from relay.parallel.layout import ParallelLayout

    layout = ParallelLayout(ulysses_degree=2)
    spec = WorkerSpec(model=str(t2v.path), layout=layout, dtype="fp32", device_type="cpu", timeout_s=2.0,
                      load_timeout_s=load_timeout_s, setup_fault={"action": "slow", "rank": 1, "seconds": 6})
    config = SchedulerConfig(step_timeout_s=300.0, load_timeout_s=300.0, health_period_s=0.0)

    def build():
        return Executor(plan_groups(t2v, None, layout=layout), replace(spec), backend="mp", config=config,
                        build_timeout_s=120.0)

    if not builds:
        with pytest.raises(GroupFailure, match="setup raised on rank 0: .*Timed out waiting 2000ms"):
            build().close()
        return
    with build() as executor:
        ticket, _ = _submit(executor, t2v)
        assert ticket.result(timeout=300).shape == (5, 32, 32, 3)


def test_out_of_memory_on_a_ray_group_fails_at_once_and_rebuilds_it_once(t2v):
    """The same on Ray actors: the actor's OutOfMemory reaches the driver through Ray's task
    error, the request fails fast without a retry, the 2-rank group is rebuilt once."""
    from relay.launch.ray_group import connect, shutdown

    started = connect(num_cpus=16)
    try:
        with _executor(t2v, "ray") as executor:
            group = executor.groups[0]
            _fails_fast_with_the_message(executor, t2v, rank=1, layout_words="ulysses=2")
            deadline = time.monotonic() + 120
            while not any(e.kind == "restart" for e in executor.scheduler.trace) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert executor.scheduler.restarts[group.name] == 1
            ticket, _ = _submit(executor, t2v)
            assert ticket.result(timeout=300).shape == (5, 32, 32, 3) and ticket.attempts == 0
    finally:
        if started:
            shutdown()


class _Unplaceable:
    """A stand-in group (sleeps, real states) whose first step fails as if its node were lost,
    and whose rebuilds fail until ``room`` is set (capacity came back)."""

    def __init__(self, rejoins: bool) -> None:
        import threading

        from relay.launch.standin import SleepGroup
        from relay.parallel.simulate import GroupCost

        cost = GroupCost(name="fused0", roles=("encode", "high_noise", "low_noise", "decode"), gpus=1,
                         step_s={"high_noise": 0.001, "low_noise": 0.001})
        self.group = SleepGroup(cost)
        self.group.rejoins = rejoins
        self.room = threading.Event()
        self.tried = threading.Semaphore(0)
        self.tries = 0
        self.lost = True
        advance, restart = self.group.advance_chunks, self.group.restart

        def advance_chunks(**kwargs):
            from relay.engine.tickets import GroupFailure

            if self.lost:
                self.lost = False
                raise GroupFailure("group fused0: a worker died during advance (node lost)")
            yield from advance(**kwargs)

        def rebuild():
            from relay.engine.tickets import GroupFailure

            self.tries += 1
            try:
                if not self.room.is_set():
                    raise GroupFailure("group fused0 cannot be placed: missing GPU (1 needed, 0 free)")
                restart()
            finally:
                self.tried.release()

        self.group.advance_chunks, self.group.restart = advance_chunks, rebuild


@pytest.mark.parametrize("retry_s, rejoins", [(0.05, True), (0.0, True), (0.05, False)])
def test_a_group_that_cannot_be_rebuilt_retires_then_serves_once_it_builds(retry_s, rejoins):
    from relay.engine.scheduler import RequestFailed, SchedulerConfig, StageScheduler

    from relay.engine.metrics import RECORDER

    experts = ["high_noise", "high_noise", "low_noise"]
    flaky = _Unplaceable(rejoins)
    gauge = _Gauge("relay_group_retired")
    RECORDER.add_sink(gauge)
    scheduler = StageScheduler([flaky.group], SchedulerConfig(health_period_s=0.0, rebuild_retry_s=retry_s))
    retrying = bool(retry_s and rejoins)
    why = ("no live worker group runs stage high_noise (group fused0 retired: rebuild failed: "
           "group fused0 cannot be placed: missing GPU (1 needed, 0 free)"
           + ("; it tries to build again every 0.05s)" if retrying else ")"))
    try:
        with pytest.raises(RequestFailed) as failed:
            scheduler.submit({"experts": experts}, experts=experts).result(timeout=30)
        assert why in str(failed.value)
        assert scheduler.retired == {"fused0": "rebuild failed: group fused0 cannot be placed: missing GPU "
                                               "(1 needed, 0 free)"}
        assert gauge.values == {"fused0": [0, 1]}
        with pytest.raises(RequestFailed, match="group fused0 retired: rebuild failed"):
            scheduler.submit({"experts": experts}, experts=experts)
        # What health checks read: every stage of the placement, and why it is not served.
        assert scheduler.unserved() == why.replace("stage high_noise", f"stage(s) {sorted(set(flaky.group.roles))}")
        with pytest.raises(ValueError, match="no group 'nope'"):
            scheduler.wait_serving("nope")
        if not retrying:  # retired for good: no further try, and nothing to wait for
            began = time.monotonic()
            assert not scheduler.wait_serving("fused0", timeout_s=60) and flaky.tries == 1
            assert time.monotonic() - began < 30
            return
        for _ in range(2):  # the first rebuild, then at least one periodic try that still fails
            assert flaky.tried.acquire(timeout=10)
        flaky.room.set()  # a node joins
        assert scheduler.wait_serving("fused0", timeout_s=10) and scheduler.retired == {}
        assert scheduler.unserved() is None and gauge.values == {"fused0": [0, 1, 0]}
        events = []
        ticket = scheduler.submit({"experts": experts}, experts=experts,
                                  on_event=lambda kind, data: events.append((kind, data.get("step"))))
        ticket.result(timeout=30)  # raises if the request failed (a stand-in decodes to no frames)
        assert [step for kind, step in events if kind == "progress"] == [1, 2, 3] and events[-1][0] == "done"
        assert ticket.attempts == 0
        assert [e.kind for e in scheduler.trace].count("rejoin") == flaky.tries - 1 >= 2
        assert scheduler.restarts == {"fused0": 1}  # tries at rejoining are not restarts
    finally:
        scheduler.close()
        RECORDER.remove_sink(gauge)


class _Gauge:
    """A metrics sink keeping the values one gauge was set to, by its ``group`` label."""

    def __init__(self, name: str) -> None:
        self.name, self.values = name, {}

    def record(self, metric, op, value, labels) -> None:
        if metric.name == self.name and op == "set":
            self.values.setdefault(labels["group"], []).append(int(value))


def test_grpc_health_is_not_serving_while_a_stage_has_no_worker_group(tiny_models):
    """``relay serve``'s health follows what the engine can serve: NOT_SERVING once the only
    group is retired (its rebuild found no room), SERVING again once a periodic try built it --
    so a readiness probe or a load balancer stops sending work that would be refused."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from relay.engine.model_info import read_model_info
    from relay.engine.scheduled import ScheduledRunner
    from relay.engine.scheduler import RequestFailed, SchedulerConfig, StageScheduler
    from relay.engine.service import AsyncEngine
    from relay.serve.server import RelayServer, ServerConfig

    experts = ["high_noise", "high_noise", "low_noise"]
    flaky = _Unplaceable(rejoins=True)
    scheduler = StageScheduler([flaky.group], SchedulerConfig(health_period_s=0.0, rebuild_retry_s=0.05))
    info = read_model_info(tiny_models["t2v"])
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    async def main():
        engine = AsyncEngine({"m": ScheduledRunner(scheduler, info, name="m", tokenizer=None)}, default_model="m")
        server = RelayServer(engine, {"m": info}, ServerConfig(port=0))
        await server.start()
        engine.start()
        await server.set_serving(True)
        watch = asyncio.ensure_future(server.watch_capacity(period_s=0.02))
        seen = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def until(status) -> None:
                for _ in range(1000):  # the watcher looks every 20 ms
                    now = (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)).status
                    if not seen or seen[-1] != now:
                        seen.append(now)
                    if now == status:
                        return
                    await asyncio.sleep(0.02)
                raise AssertionError(f"health never became {status}: {seen}")

            await until(SERVING)
            ticket = scheduler.submit({"experts": experts}, experts=experts)
            with pytest.raises(RequestFailed, match="retired"):
                await asyncio.to_thread(ticket.result, 30)
            await until(NOT_SERVING)  # retired, trying again every 50 ms
            flaky.room.set()  # a node joins: the next try builds the group
            await until(SERVING)
            assert await asyncio.to_thread(scheduler.wait_serving, "fused0", 10)
        await server.drain()
        await asyncio.wait_for(watch, 10)  # the watcher ends with the drain
        return seen

    try:
        assert asyncio.run(main()) == [SERVING, NOT_SERVING, SERVING]
    finally:
        scheduler.close()
