"""The :class:`~engine.tickets.WorkerGroup` protocol on top of collective calls.

An executor's group differs from another's only in how a call reaches its ranks and how the
ranks exist (vLLM's ``collective_rpc``): :class:`CallGroup` implements every scheduler-facing
method -- prepare, begin, pipelined advance, decode, memory, fault injection -- once, over three
primitives a backend provides:

* ``_build()`` / ``_teardown()``: make the ranks exist (and join their process group) / end them;
* ``_send(method, args, faults) -> handle``: start ``StageWorker.execute(method, args,
  fault)`` on every rank (``faults[rank]``: a fault update for that rank, or ``None``);
* ``_receive(handle, timeout_s) -> [result per rank]``: wait for the results; a dead rank, an
  error on a rank or the deadline raises :class:`~engine.tickets.GroupFailure`.

Calls on a group are issued by one thread at a time (the scheduler's thread for that group).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace

from relay.engine.tickets import GroupFailure
from relay.launch.worker import FAULT_ACTIONS, WorkerSpec

log = logging.getLogger(__name__)


class CallGroup:
    """A worker group of ``spec.layout.world_size`` ranks (see the module docstring).

    Args:
        name: Group name (for logs, traces and run stats).
        roles: Stages the group runs.
        spec: What each rank loads (its ``roles`` are replaced by ``roles``).
    """

    #: Backend name for run stats and logs (``inprocess``, ``mp``, ``torchrun``, ``ray``).
    backend = "base"
    #: Whether the scheduler pings the group when idle (its ranks are processes that can freeze
    #: and that it can rebuild).
    health_checked = True
    #: Whether a group retired because it could not be rebuilt may try again later
    #: (``SchedulerConfig.rebuild_retry_s``): the backend starts its own ranks.
    rejoins = True

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec) -> None:
        self.name = name
        self.roles = tuple(roles)
        self.spec = replace(spec, roles=self.roles)
        self.builds = 0
        self._faults: dict[int, dict] = {}  # rank -> armed fault (driver side)
        self._persistent: set[int] = set()
        self._unsent: set[int] = set()  # ranks whose fault update has not been sent yet
        self._broken: str | None = None  # set when a call could not be completed cleanly
        self._discard_timeout_s = 60.0
        self._attention: str | None = None  # the ranks' attention kernel, once asked
        # build, restart and teardown exclude each other: an executor closing while the
        # scheduler rebuilds the group waits for the build, then tears the new ranks down.
        self._lifecycle = threading.RLock()
        # Set by shutdown (before it waits for the lifecycle lock): a build in progress gives up
        # at its next poll and no new one starts, so closing never waits out a placement.
        self._closing = threading.Event()

    @property
    def size(self) -> int:
        """Ranks in the group."""
        return self.spec.layout.world_size

    def describe(self) -> dict:
        """``{"name", "roles", "ranks", "layout", "backend", "attention", "vae"}`` for logs and run
        stats; ``attention`` is the kernel the ranks run (:meth:`attention_kernel`); ``vae`` is
        how it decodes (:data:`parallel.cost.VAE_MODES`)."""
        vae = ("parallel" if self.spec.vae_parallel and self.size > 1 else
               "tiled" if self.spec.vae_tiling else "whole")
        return {"name": self.name, "roles": list(self.roles), "ranks": self.size,
                "layout": self.spec.layout.spec(), "backend": self.backend, "attention": self.attention_kernel(),
                "vae": vae}

    def attention_kernel(self) -> str:
        """The attention kernel this group's ranks run, as they report it
        (:meth:`launch.worker.StageWorker.attention_kernel`: a :mod:`parallel.kernels` name, or
        ``sdpa`` for the library's own attention; ``a | b`` if ranks differ), asked once per
        build (or, for ranks built elsewhere -- torchrun --, at the first description); if the
        ranks cannot answer, ``"unknown"`` until the next build."""
        if self._attention is None:
            try:
                kernels = self.call("attention_kernel", timeout_s=60.0)
                self._attention = " | ".join(dict.fromkeys(kernels))
            except Exception as exc:  # noqa: BLE001 - a description never fails a caller
                log.warning("group %s: its ranks did not say which attention kernel they run: %s", self.name, exc)
                self._attention = "unknown"
        return self._attention

    # --- what a backend provides -----------------------------------------------------------
    def _build(self) -> None:
        raise NotImplementedError

    def _teardown(self) -> None:
        raise NotImplementedError

    def _send(self, method: str, args: tuple, faults: list):
        raise NotImplementedError

    def _receive(self, handle, timeout_s: float) -> list:
        raise NotImplementedError

    def _discard(self, handle) -> None:
        """Collects a call whose result is not wanted (an advance left queued by a cancellation)."""
        self._receive(handle, self._discard_timeout_s)

    def _share(self, state):
        """How a state reaches every rank (Ray: one object-store put); default: as it is."""
        return state

    # --- lifecycle ----------------------------------------------------------------------------
    def build(self) -> None:
        """Makes the ranks exist, joins their group and loads the model on each.

        Raises:
            ModelError: the model folder cannot be loaded (not the group's fault: no retry helps).
            GroupFailure: a rank failed to start or load within the backend's timeout.
        """
        with self._lifecycle:
            if self._closing.is_set():
                raise GroupFailure(f"group {self.name} is shut down")
            self._broken = None
            self._unsent = set(self._faults)
            began = time.monotonic()
            self._attention = None  # asked again: a rebuilt group may sit on other GPUs
            self._build()
            self.builds += 1
            # Which process is which rank: what an operator (or a fault test) needs to find them.
            log.info("group %s built (%s, build %d) in %.1fs: %d rank(s), pids %s, attention %s", self.name,
                     self.backend, self.builds, time.monotonic() - began, self.size, self.ping(timeout_s=60.0),
                     self.attention_kernel())

    def restart(self) -> None:
        """Tears the whole group down and builds it again (process groups cannot be patched);
        faults armed without ``persistent`` are dropped."""
        with self._lifecycle:
            self.teardown()
            self._faults = {rank: f for rank, f in self._faults.items() if rank in self._persistent}
            self.build()

    def teardown(self) -> None:
        """Ends every rank (idempotent; waits for a build in progress on another thread)."""
        with self._lifecycle:
            self._teardown()

    def stop_building(self) -> None:
        """Makes a build in progress give up at its next poll and refuses new ones (returns at
        once; :meth:`shutdown` then tears down whatever was built)."""
        self._closing.set()

    @property
    def closing(self) -> bool:
        """Whether the group is being shut down for good (no build may start or finish)."""
        return self._closing.is_set()

    def shutdown(self) -> None:
        """Ends the group for good: a build in progress gives up, then every rank ends."""
        self.stop_building()
        self.teardown()

    # --- calls --------------------------------------------------------------------------------
    def _start(self, method: str, *args):
        if self._broken is not None:
            raise GroupFailure(f"group {self.name}: {self._broken}")
        faults = [None] * self.size
        for rank in self._unsent:
            faults[rank] = self._faults.get(rank, {})
        self._unsent = set()
        return self._send(method, args, faults)

    def call(self, method: str, *args, timeout_s: float) -> list:
        """``StageWorker.execute(method, args)`` on every rank; the results, by rank."""
        return self._receive(self._start(method, *args), timeout_s)

    def arm_fault(self, fault: dict | None, *, rank: int = 0, persistent: bool = False) -> None:
        """Arms a fault on one rank from its next call on (resilience tests; see
        :meth:`StageWorker.execute`); ``persistent`` re-arms it on every rebuild (a request
        that always breaks its group). ``None`` disarms."""
        if fault is not None and fault.get("action") not in FAULT_ACTIONS:
            raise ValueError(f"fault action must be one of {FAULT_ACTIONS}, got {fault!r}")
        if fault is None:
            self._faults.pop(rank, None)
            self._persistent.discard(rank)
        else:
            self._faults[rank] = fault
            (self._persistent.add if persistent else self._persistent.discard)(rank)
        self._unsent.add(rank)

    # --- the WorkerGroup interface of engine.scheduler -----------------------------------------
    def prepare(self, request: dict, *, timeout_s: float):
        """Runs the encode stage on every rank; returns the output rank's state."""
        return self.call("prepare", request, timeout_s=timeout_s)[0]

    def begin(self, state, *, timeout_s: float) -> None:
        """Hands ``state`` to every rank (``None``: every rank continues with what it holds)."""
        self.call("begin", self._share(state) if state is not None else None, timeout_s=timeout_s)

    def advance_chunks(self, *, until: int, chunks: list[tuple[int, bool]], timeout_s: float):
        """Runs the chunks on every rank, yielding the output rank's ``(events, progress, png)``
        after each.

        The next chunk is queued on the ranks while the driver reads the previous result, so a
        group never idles between steps waiting for the driver; each chunk still returns its
        checkpoint. Closing the generator early (cancellation) waits for the chunk still queued
        (its run is replaced by the next :meth:`begin`).
        """
        pending: deque = deque()
        queued = iter(chunks)

        def submit() -> None:
            chunk = next(queued, None)
            if chunk is not None:
                steps, preview = chunk
                pending.append(self._start("advance", until, steps, preview))

        try:
            submit()
            submit()
            while pending:
                result = self._receive(pending.popleft(), timeout_s)[0]
                submit()
                yield result
        except GroupFailure as exc:
            if not getattr(exc, "keep", False):  # the group is done for: nothing to collect
                self._broken = str(exc)
                pending.clear()
            raise
        finally:
            self._discard_timeout_s = timeout_s
            while pending:  # a call left in flight must be collected before the next one
                try:
                    self._discard(pending.popleft())
                except GroupFailure as exc:
                    self._broken = str(exc)

    def decode(self, state, *, timeout_s: float):
        """Decodes (``state`` ``None``: the group's current run); ``(frames, reports)``: one
        report per rank that took part (:meth:`launch.worker.StageWorker.decode`)."""
        results = self.call("decode", self._share(state) if state is not None else None, timeout_s=timeout_s)
        return results[0][0], [r[1] for r in results if r is not None]

    def memory(self, *, timeout_s: float) -> list[dict]:
        """Each rank's peak memory since the previous call."""
        return self.call("memory", timeout_s=timeout_s)

    def ping(self, *, timeout_s: float = 60.0) -> list[int]:
        """Each rank's pid."""
        return self.call("ping", timeout_s=timeout_s)
