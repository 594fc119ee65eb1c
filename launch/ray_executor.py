"""Ray worker groups: one actor per device, reserved with a placement group, forming one
``torch.distributed`` group (NCCL on GPU, gloo on CPU). The only module that imports ray.

A :class:`RayWorkerGroup` reserves its devices (``STRICT_PACK`` on one node by default,
``SPREAD`` when asked), starts one :class:`RankActor` per bundle, lets rank 0 pick the
rendezvous address on its node and gives every actor its :class:`~parallel.groups.RankInfo`; the
actor builds the same :class:`~launch.worker.StageWorker` that torchrun and the local spawner
build. Group calls go to every actor (lock-step) and are watched: a dead actor or a call past its
deadline raises :class:`engine.scheduler.GroupFailure`, after which the scheduler calls
:meth:`RayWorkerGroup.restart` (process groups cannot be patched, so the whole group is torn
down and rebuilt). States travel through the Ray object store: the driver puts a state once and
every actor of the next group reads it from there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import replace

from relay.engine.scheduler import GroupFailure
from relay.launch.worker import StageWorker, WorkerSpec
from relay.parallel.groups import RankInfo

log = logging.getLogger(__name__)

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Joins an existing Ray cluster (``address``) or starts a local one (dashboard off).

    A local Ray gets at least 16 logical CPUs: on CPU every rank reserves one, whatever the
    core count (the ranks share the cores; torch threads are divided among them).

    Returns:
        True when this call connected (the caller should :func:`shutdown`), False when this
        process was already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or max(16, os.cpu_count() or 1), include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    return True


def shutdown() -> None:
    """Disconnects from (and, if started here, stops) Ray."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class RankActor:
    """One rank of a Ray worker group (wrapped with ``ray.remote`` in :meth:`RayWorkerGroup.build`)."""

    def __init__(self) -> None:
        self.worker: StageWorker | None = None
        self.fault: dict | None = None

    def rendezvous(self) -> str:
        """A ``tcp://ip:port`` init address on this actor's node (rank 0 only)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
            return f"tcp://{ip}:{sock.getsockname()[1]}"

    def setup(self, info: RankInfo, spec: WorkerSpec) -> int:
        """Joins the group and loads; returns this process's pid."""
        self.worker = StageWorker(info, spec)
        return os.getpid()

    def arm_fault(self, fault: dict | None) -> None:
        """Fault injection for resilience tests: ``{"action": "exit" | "hang", "method":
        "prepare" | "begin" | "advance" | "decode", "at_step": N (advance only), "seed": S
        (only for that request)}``; the actor really exits (``os._exit``) or hangs."""
        self.fault = fault

    def _maybe_fail(self, method: str, request: dict | None, step_range: range | None = None) -> None:
        fault = self.fault
        if not fault or fault.get("method") != method:
            return
        if fault.get("seed") is not None and (request or {}).get("seed") != fault["seed"]:
            return
        at = fault.get("at_step")
        if step_range is not None and at is not None:
            if at not in step_range:
                return
            self.worker.run.run(until=at)  # the steps before the fault really run
        if fault["action"] == "hang":
            time.sleep(10**6)
        os._exit(17)

    def prepare(self, request: dict):
        """See :meth:`StageWorker.prepare`."""
        self._maybe_fail("prepare", request)
        return self.worker.prepare(request)

    def begin(self, state) -> None:
        """See :meth:`StageWorker.begin`."""
        self._maybe_fail("begin", state.request if state is not None else self.worker.request)
        self.worker.begin(state)

    def advance(self, until: int, max_steps: int, preview: bool):
        """See :meth:`StageWorker.advance`."""
        run = self.worker.run
        if run is not None:
            self._maybe_fail("advance", run.request, range(run.step_index, min(until, run.step_index + max_steps)))
        return self.worker.advance(until=until, max_steps=max_steps, preview=preview)

    def decode(self, state):
        """See :meth:`StageWorker.decode`."""
        self._maybe_fail("decode", state.request if state is not None else self.worker.request)
        return self.worker.decode(state)

    def close(self) -> None:
        """Leaves the process group."""
        if self.worker is not None:
            self.worker.close()


class RayWorkerGroup:
    """A worker group of Ray actors (see the module docstring).

    Args:
        name: Group name (for logs, traces and actor names).
        roles: Stages the group runs.
        spec: What each rank loads (its ``roles`` are replaced by ``roles``).
        strategy: Placement-group strategy; ``STRICT_PACK`` keeps the group on one node.
        build_timeout_s: How long to wait for devices and for every rank to load.
    """

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec,
                 strategy: str = "STRICT_PACK", build_timeout_s: float = 600.0) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.name = name
        self.roles = tuple(roles)
        self.spec = replace(spec, roles=self.roles)
        self.strategy = strategy
        self.build_timeout_s = build_timeout_s
        self.actors: list = []
        self.pids: list[int] = []
        self.placement_group = None
        self.builds = 0
        self._uid = uuid.uuid4().hex[:8]  # names are unique per cluster: executors may share one
        self._faults: dict[int, dict | None] = {}

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return self.spec.layout.world_size

    def _bundle(self) -> dict:
        return {"GPU": 1, "CPU": 1} if self.spec.device_type == "cuda" else {"CPU": 1}

    def build(self) -> None:
        """Reserves the devices, starts the actors and forms the process group.

        Raises:
            GroupFailure: devices not available or a rank failed to start within the timeout.
        """
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.placement_group = placement_group([self._bundle()] * self.size, strategy=self.strategy,
                                               name=f"relay-{self.name}-{self._uid}-{self.builds}")
        try:
            ray.get(self.placement_group.ready(), timeout=self.build_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.teardown()
            raise GroupFailure(f"group {self.name}: {self.size} x {self._bundle()} not available on the "
                               f"Ray cluster after {self.build_timeout_s:.0f}s") from None
        remote = ray.remote(RankActor)
        gpu = self.spec.device_type == "cuda"
        self.actors = [
            remote.options(
                num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_concurrency=1,
                name=f"relay-{self.name}-r{rank}-{self._uid}-{self.builds}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=rank),
            ).remote()
            for rank in range(self.size)
        ]
        self.builds += 1
        try:
            init = ray.get(self.actors[0].rendezvous.remote(), timeout=self.build_timeout_s)
            # Each actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES): local rank 0.
            infos = [RankInfo(rank=r, local_rank=0, world_size=self.size, init_method=init)
                     for r in range(self.size)]
            self.pids = self._gather([a.setup.remote(i, self.spec) for a, i in zip(self.actors, infos, strict=True)],
                                     "setup", self.build_timeout_s)
            for rank, fault in self._faults.items():
                ray.get(self.actors[rank].arm_fault.remote(fault), timeout=60)
        except GroupFailure:
            self.teardown()
            raise

    def _gather(self, refs: list, what: str, timeout_s: float) -> list:
        """Waits for every rank's result; the first error or the deadline fails the group."""
        import ray

        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise GroupFailure(f"group {self.name}: {what} exceeded its {timeout_s:.0f}s watchdog")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                raise GroupFailure(f"group {self.name}: a worker died during {what}: "
                                   f"{type(exc).__name__}") from None
            except ray.exceptions.RayTaskError as exc:
                raise GroupFailure(f"group {self.name}: {what} raised {exc.cause!r}") from None
        return ray.get(refs)

    def _call(self, method: str, *args, timeout_s: float):
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        return self._gather(refs, method, timeout_s)[0]

    # --- the WorkerGroup interface of engine.scheduler ----------------------------------------
    def prepare(self, request: dict, *, timeout_s: float):
        """Runs the encode stage on every rank; returns rank 0's state."""
        return self._call("prepare", request, timeout_s=timeout_s)

    def begin(self, state, *, timeout_s: float) -> None:
        """Hands ``state`` to every rank through the object store (put once, read by each);
        ``None``: every rank continues with what it holds."""
        import ray

        self._call("begin", ray.put(state) if state is not None else None, timeout_s=timeout_s)

    def advance_chunks(self, *, until: int, chunks: list[tuple[int, bool]], timeout_s: float):
        """Runs the chunks on every rank, yielding rank 0's ``(events, progress, png)`` after each.

        The next chunk is queued on the actors while the driver reads the previous result, so
        a group never idles between steps waiting for the driver; each chunk still returns its
        checkpoint. Closing the generator early (cancellation) leaves at most one chunk queued,
        whose run the next :meth:`begin` replaces.
        """
        pending: list[list] = []
        queued = iter(chunks)

        def submit() -> None:
            chunk = next(queued, None)
            if chunk is not None:
                steps, preview = chunk
                pending.append([actor.advance.remote(until, steps, preview) for actor in self.actors])

        submit()
        submit()
        while pending:
            refs = pending.pop(0)
            result = self._gather(refs, "advance", timeout_s)[0]
            submit()
            yield result

    def decode(self, state, *, timeout_s: float):
        """Decodes on rank 0 (``state`` ``None``: the group's current run)."""
        import ray

        return self._call("decode", ray.put(state) if state is not None else None, timeout_s=timeout_s)

    def arm_fault(self, fault: dict | None, *, rank: int = 0, persistent: bool = False) -> None:
        """Arms :meth:`RankActor.arm_fault` on one rank (resilience tests); a persistent fault
        is armed again on every rebuild (a request that always breaks its group)."""
        import ray

        if persistent:
            self._faults[rank] = fault
        ray.get(self.actors[rank].arm_fault.remote(fault), timeout=60)

    def restart(self) -> None:
        """Tears the whole group down and builds it again."""
        self.teardown()
        self.build()

    def teardown(self) -> None:
        """Kills the actors, frees the placement group and waits for the processes to exit."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001 - already removed
                pass
        _wait_exited(self.pids, timeout_s=30)
        self.actors, self.pids, self.placement_group = [], [], None

    def shutdown(self) -> None:
        """Ends the group for good (same as :meth:`teardown`)."""
        self.teardown()


def _wait_exited(pids: list[int], *, timeout_s: float) -> None:
    """Waits until processes on this node have exited (remote ones cannot be checked)."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent's wait() is missing
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class RayExecutor:
    """The worker groups of a placement on Ray, and the stage scheduler over them.

    Args:
        placement: Groups to build (:func:`launch.placement.plan_groups`).
        spec: What every rank loads (roles and layout are set per group).
        config: Scheduling policy.
        address: Ray cluster address; ``None`` starts a local Ray (dashboard off).
        strategy: Placement-group strategy of every group.
    """

    def __init__(self, placement, spec: WorkerSpec, *, config=None, address: str | None = None,
                 strategy: str = "STRICT_PACK") -> None:
        from concurrent.futures import ThreadPoolExecutor

        from relay.engine.scheduler import SchedulerConfig, StageScheduler

        connect(address)
        if spec.device_type == "cpu" and spec.threads is None and address is None:
            # Groups run at the same time: share this machine's cores among all their ranks.
            spec = replace(spec, threads=max(1, (os.cpu_count() or 1) // placement.devices))
        self.placement = placement
        self.groups = [RayWorkerGroup(name=plan.name, roles=plan.roles, spec=replace(spec, layout=plan.layout),
                                      strategy=strategy)
                       for plan in placement.groups]
        with ThreadPoolExecutor(max_workers=len(self.groups)) as pool:  # groups load in parallel
            failures = [f.exception() for f in [pool.submit(g.build) for g in self.groups]]
        if any(failures):
            for group in self.groups:
                group.teardown()
            raise next(f for f in failures if f)
        self.scheduler = StageScheduler(self.groups, config or SchedulerConfig())

    def group(self, name: str) -> RayWorkerGroup:
        """The group called ``name``."""
        return next(g for g in self.groups if g.name == name)

    def close(self) -> None:
        """Stops scheduling and tears every group down (Ray itself stays up)."""
        self.scheduler.close()
        for group in self.groups:
            group.teardown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
