"""Ray worker groups (the ``ray`` backend): one actor per device, reserved with a placement
group, forming one ``torch.distributed`` group (NCCL on GPU, gloo on CPU). The only module that
imports ray.

A :class:`RayWorkerGroup` reserves its devices (``STRICT_PACK`` on one node by default,
``SPREAD`` when asked), starts one :class:`RankActor` per bundle, lets rank 0 pick the
rendezvous address on its node and gives every actor its :class:`~parallel.groups.RankInfo`; the
actor builds the same :class:`~launch.worker.StageWorker` every backend builds and executes the
driver's calls on it. Group calls go to every actor (lock-step) and are watched: a dead actor or
a call past its deadline raises :class:`engine.tickets.GroupFailure`, after which the scheduler
calls :meth:`RayWorkerGroup.restart` (process groups cannot be patched, so the whole group is
torn down and rebuilt). States travel through the Ray object store: the driver puts a state once
and every actor of the group reads it from there.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

from relay.engine.errors import ModelError, OutOfMemory
from relay.engine.tickets import GroupFailure, GroupOutOfMemory
from relay.launch.group import CallGroup
from relay.launch.worker import StageWorker, WorkerSpec
from relay.parallel.groups import RankInfo

log = logging.getLogger(__name__)

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


#: Tries at starting (or joining) Ray before giving up: a local start can time out under load
#: ("Timed out waiting for file .../gcs_server_port_...").
RAY_START_ATTEMPTS = 3


def connect(address: str | None = None, *, num_cpus: int | None = None,
            attempts: int = RAY_START_ATTEMPTS) -> bool:
    """Joins an existing Ray cluster (``address``) or starts a local one (dashboard off).

    A local Ray gets at least 16 logical CPUs: on CPU every rank reserves one, whatever the
    core count (the ranks share the cores; torch threads are divided among them). A start that
    fails is retried (after a clean ``ray.shutdown``) up to ``attempts`` times.

    Returns:
        True when this call connected (the caller should :func:`shutdown`), False when this
        process was already connected.

    Raises:
        GroupFailure: Ray did not start (or could not be joined) after ``attempts`` tries.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    what = f"the Ray cluster at {address}" if address else "a local Ray"
    for attempt in range(1, attempts + 1):
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                ray.init(num_cpus=num_cpus or max(16, os.cpu_count() or 1), include_dashboard=False,
                         logging_level=logging.WARNING, log_to_driver=True)
            return True
        except Exception as exc:  # noqa: BLE001 - Ray raises several types for a failed start
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            try:
                ray.shutdown()  # leave nothing half-started behind
            except Exception:  # noqa: BLE001
                pass
            if attempt == attempts:
                raise GroupFailure(f"{what} did not start after {attempts} tries (last: {reason})") from None
            log.warning("%s did not start (try %d of %d: %s); trying again", what, attempt, attempts, reason)
            time.sleep(2.0 * attempt)
    return False  # not reached


def shutdown() -> None:
    """Disconnects from (and, if started here, stops) Ray."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


class RankActor:
    """One rank of a Ray worker group (wrapped with ``ray.remote`` in :meth:`RayWorkerGroup._build`)."""

    def __init__(self) -> None:
        self.worker: StageWorker | None = None

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

    def execute(self, method: str, args: tuple, fault):
        """See :meth:`launch.worker.StageWorker.execute`; a state shared through the object
        store arrives as a reference inside ``args`` and is read from the store here."""
        import ray

        args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
        return self.worker.execute(method, args, fault)

    def close(self) -> None:
        """Leaves the process group."""
        if self.worker is not None:
            self.worker.close()


class RayWorkerGroup(CallGroup):
    """A worker group of Ray actors (see the module docstring).

    Args:
        name: Group name (for logs, traces and actor names).
        roles: Stages the group runs.
        spec: What each rank loads (its ``roles`` are replaced by ``roles``).
        strategy: Placement-group strategy; ``STRICT_PACK`` keeps the group on one node.
        build_timeout_s: How long to wait for devices and for every rank to load.
    """

    backend = "ray"

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec,
                 strategy: str = "STRICT_PACK", build_timeout_s: float = 600.0) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        super().__init__(name=name, roles=roles, spec=spec)
        self.strategy = strategy
        self.build_timeout_s = build_timeout_s
        self.actors: list = []
        self.pids: list[int] = []
        self.placement_group = None
        self._uid = uuid.uuid4().hex[:8]  # names are unique per cluster: executors may share one

    def _bundle(self) -> dict:
        return {"GPU": 1, "CPU": 1} if self.spec.device_type == "cuda" else {"CPU": 1}

    def _build(self) -> None:
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
        try:
            init = ray.get(self.actors[0].rendezvous.remote(), timeout=self.build_timeout_s)
            # Each actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES): local rank 0.
            infos = [RankInfo(rank=r, local_rank=0, world_size=self.size, init_method=init)
                     for r in range(self.size)]
            self.pids = self._gather([a.setup.remote(i, self.spec) for a, i in zip(self.actors, infos, strict=True)],
                                     "setup", self.build_timeout_s)
        except (GroupFailure, ModelError):
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
                if what == "setup" and isinstance(exc.cause, ModelError):
                    raise ModelError(str(exc.cause)) from None  # the folder, not the group
                if isinstance(exc.cause, OutOfMemory):
                    keep = self.size == 1 and what != "setup"
                    raise GroupOutOfMemory(f"group {self.name}: {exc.cause}", oom=exc.cause, keep=keep) from None
                raise GroupFailure(f"group {self.name}: {what} raised {exc.cause!r}") from None
        return ray.get(refs)

    def _send(self, method: str, args: tuple, faults: list):
        if not self.actors:
            raise GroupFailure(f"group {self.name} is not built")
        return method, [actor.execute.remote(method, args, fault) for actor, fault in zip(self.actors, faults)]

    def _receive(self, handle, timeout_s: float) -> list:
        method, refs = handle
        return self._gather(refs, method, timeout_s)

    def _discard(self, handle) -> None:
        """Nothing to collect: an abandoned call's result stays in the object store until freed."""

    def _share(self, state):
        """Puts ``state`` into the object store once; every actor reads it from there."""
        import ray

        return ray.put(state)

    def _teardown(self) -> None:
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
