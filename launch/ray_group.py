"""Ray worker groups (the ``ray`` backend): one actor per device, reserved with a placement
group, forming one ``torch.distributed`` group (NCCL on GPU, gloo on CPU). The only module that
imports ray.

A :class:`RayWorkerGroup` reserves its devices (``STRICT_PACK`` on one node by default,
``PACK``, ``SPREAD`` or ``STRICT_SPREAD`` when asked; a group can be held to the nodes that carry
custom resources, see ``resources``), starts one :class:`RankActor` per bundle, lets rank 0 pick
the rendezvous address on its node and gives every actor its :class:`~parallel.groups.RankInfo`;
the actor builds the same :class:`~launch.worker.StageWorker` every backend builds and executes
the driver's calls on it. Group calls go to every actor (lock-step) and are watched: a dead actor
(its process, or its whole node) or a call past its deadline raises
:class:`engine.tickets.GroupFailure`, after which the scheduler calls
:meth:`RayWorkerGroup.restart` (process groups cannot be patched, so the whole group is torn down
-- its actors killed, its placement group removed -- and rebuilt on the nodes that are alive).
States travel through the Ray object store: the driver puts a state once and every actor of the
group reads it from there.

Placement is waited for in short polls. A group that the alive nodes cannot hold -- their total
resources, less what this executor's other groups hold on them, are too few for its bundles
under its strategy (a node was lost and no spare capacity is left, or no node carries a resource
it asks for) -- fails after :data:`INFEASIBLE_WAIT_S` with a message naming what is missing and
the nodes the cluster lost; one that fits but waits for resources other work holds waits up to
``build_timeout_s``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid

from relay.engine.errors import ModelError, OutOfMemory
from relay.engine.tickets import GroupFailure, GroupOutOfMemory
from relay.launch.group import CallGroup
from relay.launch.worker import StageWorker, WorkerSpec
from relay.parallel.groups import RankInfo

log = logging.getLogger(__name__)

#: Placement-group strategies (``cli.flags`` repeats them: it imports no Ray).
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
#: How much of each custom resource in ``resources`` a bundle asks for: the resource works as a
#: node tag (``ray start --resources '{"relay-high": 1}'`` marks a node; any amount will do).
TAG_AMOUNT = 0.001
#: Seconds a placement that the alive nodes cannot hold is waited for before the build fails (a
#: node that is joining, or another group's teardown still freeing its reservation).
INFEASIBLE_WAIT_S = 5.0
#: Seconds between two looks at a pending placement group.
PLACEMENT_POLL_S = 0.5


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
        strategy: Placement-group strategy (:data:`STRATEGIES`); ``STRICT_PACK`` keeps the group
            on one node, ``STRICT_SPREAD`` puts each rank on a node of its own.
        build_timeout_s: How long to wait for devices and for every rank to load.
        resources: Custom Ray resources every bundle also asks for (:data:`TAG_AMOUNT` of each):
            the group is placed only on nodes started with them (``ray start --resources``).
        peers: The executor's groups (this one may be among them): what they hold on the alive
            nodes is not counted as room for this group when a placement is judged infeasible.

    Attributes:
        nodes: Per rank, the Ray node id its bundle was placed on at the last build.
    """

    backend = "ray"

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec,
                 strategy: str = "STRICT_PACK", build_timeout_s: float = 600.0,
                 resources: tuple[str, ...] = (), peers: list | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        super().__init__(name=name, roles=roles, spec=spec)
        self.strategy = strategy
        self.build_timeout_s = build_timeout_s
        self.resources = tuple(resources)
        self.peers: list = peers if peers is not None else []  # the executor's list: filled after this one
        self.infeasible_wait_s = INFEASIBLE_WAIT_S
        self.actors: list = []
        self.pids: list[int] = []
        self.nodes: list[str] = []
        self.placement_group = None
        self._uid = uuid.uuid4().hex[:8]  # names are unique per cluster: executors may share one
        self._attempts = 0

    def _bundle(self) -> dict:
        bundle = {"GPU": 1, "CPU": 1} if self.spec.device_type == "cuda" else {"CPU": 1}
        return {**bundle, **{name: TAG_AMOUNT for name in self.resources}}

    def _build(self) -> None:
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        lost = self._lost_nodes()  # before a rebuild: the nodes of the last build that died
        self._attempts += 1  # names are unique per try: a failed try's actors may still be dying
        self.placement_group = placement_group([self._bundle()] * self.size, strategy=self.strategy,
                                               name=f"relay-{self.name}-{self._uid}-{self._attempts}")
        try:
            self._wait_placed(lost)
            self.nodes = [placement_group_table(self.placement_group)["bundles_to_node_id"][rank]
                          for rank in range(self.size)]
            remote = ray.remote(RankActor)
            gpu = self.spec.device_type == "cuda"
            self.actors = [
                remote.options(
                    num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=0, max_concurrency=1,
                    name=f"relay-{self.name}-r{rank}-{self._uid}-{self._attempts}",
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=rank),
                ).remote()
                for rank in range(self.size)
            ]
            init = self._gather([self.actors[0].rendezvous.remote()], "rendezvous", self.build_timeout_s,
                                building=True)[0]
            # Each actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES): local rank 0.
            infos = [RankInfo(rank=r, local_rank=0, world_size=self.size, init_method=init)
                     for r in range(self.size)]
            self.pids = self._gather([a.setup.remote(i, self.spec) for a, i in zip(self.actors, infos, strict=True)],
                                     "setup", self.build_timeout_s, building=True)
        except BaseException:  # whatever stopped the build (a node lost, shut down): nothing is left placed
            self.teardown()
            raise
        log.info("group %s placed (%s) on node(s) %s", self.name, self.strategy,
                 ", ".join(_short(node) for node in self.nodes))

    # --- placement ------------------------------------------------------------------------------
    def _wait_placed(self, lost: list[dict]) -> None:
        """Waits for the placement group; fails early when the alive nodes cannot hold it.

        Raises:
            GroupFailure: naming what is missing (and the nodes the cluster lost).
        """
        import ray

        ready = self.placement_group.ready()
        began = time.monotonic()
        deadline = began + self.build_timeout_s
        infeasible_since = None
        while True:
            done, _ = ray.wait([ready], timeout=max(0.0, min(PLACEMENT_POLL_S, deadline - time.monotonic())))
            if done:
                return
            if self.closing:
                raise GroupFailure(f"group {self.name} is shut down (it was waiting for a placement)")
            nodes = ray.nodes()
            missing = shortfall(self._bundle(), self.size, self.strategy, self._room(nodes))
            now = time.monotonic()
            if missing is None:
                infeasible_since = None
            elif infeasible_since is None:
                infeasible_since = now
            if missing is not None and now - infeasible_since >= self.infeasible_wait_s:
                raise GroupFailure(f"group {self.name} cannot be placed: the Ray cluster's alive nodes cannot "
                                   f"hold {self._needs()}: {missing}{_lost_text(lost, nodes)}")
            if now >= deadline:
                free = shortfall(self._bundle(), self.size, self.strategy, _free_now())
                raise GroupFailure(f"group {self.name}: {self._needs()} not available on the Ray cluster after "
                                   f"{self.build_timeout_s:.0f}s (the alive nodes could hold it, but other work "
                                   f"holds the resources: {free or 'free now'}){_lost_text(lost, nodes)}")

    def _needs(self) -> str:
        where = {"STRICT_PACK": "on one node", "STRICT_SPREAD": "each on its own node"}.get(self.strategy, "")
        return f"{self.size} x {_resources_text(self._bundle())} ({self.strategy}{', ' + where if where else ''})"

    def _room(self, nodes: list[dict]) -> dict[str, dict[str, float]]:
        """Per alive node, its total resources less what the peers hold there (peers whose ranks
        are alive on the nodes they were built on; a broken peer is about to let go)."""
        room = {n["NodeID"]: {k: v for k, v in n.get("Resources", {}).items() if not _synthetic(k)}
                for n in nodes if n.get("Alive")}
        for peer in self.peers:
            if peer is self or not getattr(peer, "actors", None):
                continue
            bundle = peer._bundle()
            for node in list(peer.nodes):
                if node in room:
                    for key, amount in bundle.items():
                        room[node][key] = room[node].get(key, 0.0) - amount
        return room

    def _lost_nodes(self) -> list[dict]:
        """The nodes of the last build that Ray reports dead (``[]`` on a first build)."""
        if not self.nodes:
            return []
        import ray

        dead = {n["NodeID"]: n for n in ray.nodes() if not n.get("Alive")}
        return [dead[node] for node in dict.fromkeys(self.nodes) if node in dead]

    def _gather(self, refs: list, what: str, timeout_s: float, *, building: bool = False) -> list:
        """Waits for every rank's result; the first error or the deadline fails the group (and,
        ``building``, a shutdown: a build gives up when the group is being closed)."""
        import ray

        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            left = max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(left, PLACEMENT_POLL_S) if building else left)
            if not ready:
                if building and self.closing:
                    raise GroupFailure(f"group {self.name} is shut down (it was building: {what})")
                if time.monotonic() < deadline:
                    continue
                raise GroupFailure(f"group {self.name}: {what} exceeded its {timeout_s:.0f}s watchdog")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                lost = self._lost_nodes()
                where = (f" (the Ray cluster lost {', '.join(_node_text(n) for n in lost)}, where it ran)"
                         if lost else "")
                raise GroupFailure(f"group {self.name}: a worker died during {what}: "
                                   f"{type(exc).__name__}{where}") from None
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


def shortfall(bundle: dict[str, float], count: int, strategy: str,
              room: dict[str, dict[str, float]]) -> str | None:
    """Why ``count`` x ``bundle`` cannot be placed with ``strategy`` on nodes with ``room``
    (node id -> resources); ``None`` when they fit. Pure: the infeasibility test of a build."""
    def fits(resources: dict[str, float]) -> int:
        return min(int(resources.get(key, 0.0) / amount + 1e-9) for key, amount in bundle.items())

    per_node = {node: max(0, fits(resources)) for node, resources in room.items()}
    if strategy == "STRICT_PACK":
        ok = any(k >= count for k in per_node.values())
    elif strategy == "STRICT_SPREAD":
        ok = sum(1 for k in per_node.values() if k >= 1) >= count
    else:
        ok = sum(per_node.values()) >= count
    if ok:
        return None
    missing = []
    for key, amount in bundle.items():
        have = sum(max(0.0, resources.get(key, 0.0)) for resources in room.values())
        if not any(key in resources for resources in room.values()):
            missing.append(f"{key} (no alive node has it)")
        elif have + 1e-9 < amount * count:
            missing.append(f"{key} ({_amount(amount * count)} needed, {_amount(have)} free)")
    if missing:
        text = "missing " + ", ".join(missing)
    elif strategy == "STRICT_PACK":
        text = f"no node has room for all {count} (at most {max(per_node.values(), default=0)} on one node)"
    else:
        text = f"only {sum(1 for k in per_node.values() if k)} node(s) have room for one"
    listing = "; ".join(f"{_short(node)}: {_resources_text({k: max(0.0, r.get(k, 0.0)) for k in bundle})}"
                        for node, r in room.items())
    return f"{text} [room per alive node, less this executor's other groups: {listing or 'no alive node'}]"


def _free_now() -> dict[str, dict[str, float]]:
    """Per alive node, the resources free at this moment (Ray's view)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        per_node = available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: fall back to the cluster-wide figure
        return {"cluster": dict(ray.available_resources())}
    return {node: {k: v for k, v in resources.items() if not _synthetic(k)} for node, resources in per_node.items()}


def _synthetic(key: str) -> bool:
    """Ray's own per-node and per-placement-group resources (not capacity)."""
    return (key.startswith("node:") or key in ("memory", "object_store_memory")
            or re.search(r"_group_(\d+_)?[0-9a-f]{16,}$", key) is not None)  # CPU_group_[i_]<pg id>


def _amount(value: float) -> str:
    return f"{value:g}"


def _resources_text(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_amount(v)}" for k, v in resources.items()) + "}"


def _short(node: str) -> str:
    return f"node {node[:8]}"


def _node_text(node: dict) -> str:
    return f"{_short(node['NodeID'])} ({node.get('NodeManagerAddress', '?')})"


def _lost_text(lost: list[dict], nodes: list[dict]) -> str:
    """What a failed placement message says about dead nodes."""
    if lost:
        return (f"; the cluster lost the node{'s' if len(lost) > 1 else ''} this group ran on: "
                f"{', '.join(_node_text(n) for n in lost)}")
    dead = [n for n in nodes if not n.get("Alive")]
    return f"; Ray reports {len(dead)} dead node(s): {', '.join(_node_text(n) for n in dead)}" if dead else ""


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
