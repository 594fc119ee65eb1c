"""The executor: the worker groups of a placement, built by one backend, and the stage scheduler
over them -- the one runtime behind every way of running Relay.

Backends differ only in how a group's ranks exist (vLLM's ``Executor.get_class`` with its
uni / mp / ray / external-launcher executors is the model); each builds the same
:class:`~launch.worker.StageWorker` per rank and offers the same
:class:`~engine.tickets.WorkerGroup` calls (:class:`~launch.group.CallGroup`):

======================  ==========================================================================
``inprocess``           one rank in this process (:mod:`launch.inprocess`); ``relay generate``
                        on one device
``mp``                  spawned local processes (:mod:`launch.processes`); ``--nproc N``
``torchrun``            ranks started by torchrun, driven from rank 0 (:mod:`launch.torchrun`)
``ray``                 Ray actors in placement groups, any node (:mod:`launch.ray_group`)
======================  ==========================================================================

``relay generate``, ``relay resume``, ``relay serve`` and the benches all build an
:class:`Executor` and submit to its ``scheduler``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

log = logging.getLogger(__name__)

BACKENDS = ("inprocess", "mp", "torchrun", "ray")


def backend_for(executor: str, placement) -> str:
    """The backend of ``--executor local|torchrun|ray`` for ``placement``: ``local`` is
    ``inprocess`` for a single one-device group, ``mp`` otherwise."""
    if executor == "local":
        single = len(placement.groups) == 1 and placement.groups[0].devices == 1
        return "inprocess" if single else "mp"
    if executor not in BACKENDS:
        raise ValueError(f"executor must be local, torchrun or ray, got {executor!r}")
    return executor


def group_class(backend: str) -> type:
    """The :class:`~launch.group.CallGroup` class of ``backend`` (imported on demand: only the
    ``ray`` backend imports ray)."""
    if backend == "inprocess":
        from relay.launch.inprocess import InProcessGroup

        return InProcessGroup
    if backend == "mp":
        from relay.launch.processes import ProcessGroup

        return ProcessGroup
    if backend == "ray":
        from relay.launch.ray_group import RayWorkerGroup

        return RayWorkerGroup
    if backend == "torchrun":
        raise ValueError("torchrun groups are built by the ranks themselves (relay.launch.torchrun)")
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


class Executor:
    """The groups of ``placement`` and the stage scheduler over them.

    Args:
        placement: Groups to build (:func:`launch.placement.plan_groups`).
        spec: What every rank loads (roles and layout are set per group).
        backend: ``inprocess``, ``mp`` or ``ray`` (torchrun jobs use :meth:`from_groups`).
        config: Scheduling policy (:class:`engine.tickets.SchedulerConfig`).
        ray_address: Ray cluster address; ``None`` starts a local Ray (dashboard off).
        ray_strategy: Placement-group strategy of every Ray group
            (:data:`launch.ray_group.STRATEGIES`).
        ray_resources: Custom Ray resources (node tags) a group's nodes must carry, by group
            name; ``"*"`` applies to every group (:func:`ray_resources_for`).
        build_timeout_s: How long a group may take to start and load.
        device_offset: The first local CUDA device (``inprocess`` and ``mp``): the groups take
            consecutive devices from it.

    Groups are built in parallel; if one fails, every group is torn down and the error raised.

    Raises:
        ValidationError: ``nproc``: a Ray cluster with fewer GPUs than the placement needs.
        GroupFailure: a group could not be built.
    """

    def __init__(self, placement, spec, *, backend: str = "inprocess", config=None,
                 ray_address: str | None = None, ray_strategy: str = "STRICT_PACK",
                 ray_resources: dict[str, tuple[str, ...]] | None = None,
                 build_timeout_s: float = 600.0, device_offset: int = 0) -> None:
        cls = group_class(backend)
        spec = spec.with_attention_named()  # $RELAY_ATTENTION as the driver sees it, for every rank
        self.backend = backend
        self.placement = placement
        self._ray_started = False
        if backend == "ray":
            self._connect_ray(ray_address, spec, placement, build_timeout_s)
        local = backend in ("inprocess", "mp") or (backend == "ray" and ray_address is None)
        if spec.threads is None and local and placement.devices > 1:
            # Groups run at the same time: share this machine's cores among all their ranks
            # (a GPU rank's host threads too: eight of them must not take every core each).
            spec = replace(spec, threads=max(1, (os.cpu_count() or 1) // placement.devices))
        groups, offset = [], device_offset
        for plan in placement.groups:
            options = {"name": plan.name, "roles": plan.roles, "spec": replace(spec, layout=plan.layout)}
            if backend == "inprocess":
                options["device_index"] = offset
            elif backend == "mp":
                options.update(device_offset=offset, build_timeout_s=build_timeout_s)
            else:
                options.update(strategy=ray_strategy, build_timeout_s=build_timeout_s, peers=groups,
                               resources=ray_resources_for(ray_resources, plan.name))
            groups.append(cls(**options))
            offset += plan.devices
        self._build(groups)
        self._start(groups, config)

    def _connect_ray(self, address: str | None, spec, placement, wait_s: float) -> None:
        import ray

        from relay.engine.errors import ValidationError
        from relay.launch.ray_group import connect, shutdown

        self._ray_started = connect(address)
        if spec.device_type == "cuda":
            # An existing cluster's worker nodes may still be joining (a cluster launcher or
            # KubeRay starts them after the head): wait for them; a local Ray has what it has.
            have = wait_for_resource(lambda: ray.cluster_resources().get("GPU", 0), placement.devices,
                                     timeout_s=0.0 if self._ray_started else wait_s, what="GPUs")
            if have < placement.devices:
                if self._ray_started:
                    shutdown()
                waited = "" if self._ray_started else f" after waiting {wait_s:.0f}s for nodes to join"
                raise ValidationError("nproc", f"the placement needs {placement.devices} GPUs, the Ray "
                                               f"cluster has {have:g}{waited}")

    @classmethod
    def from_groups(cls, placement, groups: list, *, config=None, backend: str = "torchrun") -> Executor:
        """An executor over groups that already exist (the torchrun ranks build their own)."""
        executor = cls.__new__(cls)
        executor.backend, executor.placement, executor._ray_started = backend, placement, False
        executor._start(groups, config)
        return executor

    def _build(self, groups: list) -> None:
        from relay.engine.tickets import GroupOutOfMemory

        if len(groups) == 1:
            failures = [_built(groups[0])]
        else:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:  # groups load in parallel
                failures = list(pool.map(_built, groups))
        if not any(failures):
            return
        for group in groups:
            group.teardown()
        failure, group = next((f, g) for f, g in zip(failures, groups, strict=True) if f)
        if isinstance(failure, GroupOutOfMemory):
            from relay.launch.memory import load_advice

            spec = group.spec
            advice = load_advice(spec.model, group.roles, spec.layout, failure.oom, offload=spec.offload,
                                 text_encoder=spec.text_encoder)
            raise GroupOutOfMemory(f"{failure} {advice}", oom=failure.oom, keep=False) from failure
        raise failure

    def _start(self, groups: list, config) -> None:
        from relay.engine.scheduler import SchedulerConfig, StageScheduler

        self.groups = groups
        layout = {"executor": self.backend, "placement": self.placement.kind,
                  "groups": [g.describe() for g in groups]}
        self.scheduler = StageScheduler(groups, config or SchedulerConfig(), layout=layout,
                                        advise=self._advise)

    def _advise(self, request: dict, group: dict, oom) -> str:
        """The scheduler's out-of-memory hook: the planner's figures (:mod:`launch.memory`)."""
        from relay.launch.memory import request_advice

        return request_advice(self.groups[0].spec.model, request, group, oom)

    def group(self, name: str):
        """The group called ``name``."""
        return next(g for g in self.groups if g.name == name)

    def close(self) -> None:
        """Stops scheduling and tears every group down (a Ray this executor started stops too);
        a group being rebuilt in the background gives up its build first."""
        for group in self.groups:
            group.stop_building()
        self.scheduler.close()
        for group in self.groups:
            group.shutdown()
        if self._ray_started:
            from relay.launch.ray_group import shutdown

            shutdown()
            self._ray_started = False

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for_resource(available, need: float, *, timeout_s: float, what: str, poll_s: float = 2.0,
                      clock=time.monotonic, sleep=time.sleep) -> float:
    """Polls ``available()`` until it reaches ``need`` or ``timeout_s`` passes (logging what is
    still missing every 30 s); returns the last amount seen."""
    began = clock()
    said = began
    have = available()
    while have < need and clock() - began < timeout_s:
        if clock() - said >= 30.0:
            log.warning("waiting for the Ray cluster: %g of %g %s so far (nodes still joining?)", have, need, what)
            said = clock()
        sleep(min(poll_s, max(0.0, timeout_s - (clock() - began))))
        have = available()
    return have


def ray_resources_for(resources: dict[str, tuple[str, ...]] | None, group: str) -> tuple[str, ...]:
    """The node tags of ``group``: those given for every group (``"*"``), then its own."""
    resources = resources or {}
    return tuple(dict.fromkeys((*resources.get("*", ()), *resources.get(group, ()))))


def _built(group) -> BaseException | None:
    """Builds ``group``; its error, or ``None``."""
    try:
        group.build()
    except Exception as exc:  # noqa: BLE001 - the caller tears every group down and raises it
        return exc
    return None
