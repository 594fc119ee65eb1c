"""A worker group of one rank in the driver's own process (the ``inprocess`` backend).

The default for one device: ``relay generate`` and ``relay serve`` without a group. The rank
joins no process group (a group of one needs none), so several in-process groups -- e.g. the two
experts of a staged placement on two GPUs of one machine -- live side by side in one process,
each driven by its own scheduler thread. A call runs on the calling thread when its result is
asked for (so a queued chunk that is never collected, after a cancellation, never runs); there
is no worker process to watch, so the watchdog does not apply, and a failure is the call's error.
"""

from __future__ import annotations

import logging

from relay.engine.errors import ModelError, OutOfMemory
from relay.engine.tickets import GroupFailure, GroupOutOfMemory
from relay.launch.group import CallGroup
from relay.launch.worker import StageWorker, WorkerSpec
from relay.parallel.groups import RankInfo

log = logging.getLogger(__name__)


class InProcessGroup(CallGroup):
    """One :class:`~launch.worker.StageWorker` in this process.

    Args:
        name: Group name.
        roles: Stages it runs.
        spec: What it loads (the layout must have one rank).
        device_index: The CUDA device it uses (``cuda:<device_index>``); ignored on a CPU.
    """

    backend = "inprocess"
    #: No process of its own to freeze: the driver's own thread runs its calls.
    health_checked = False

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec, device_index: int = 0) -> None:
        super().__init__(name=name, roles=roles, spec=spec)
        if self.size != 1:
            raise ValueError(f"an in-process group has one rank; layout {spec.layout.describe()}")
        self.device_index = device_index
        self.worker: StageWorker | None = None

    def _build(self) -> None:
        try:
            self.worker = StageWorker(RankInfo(rank=0, local_rank=self.device_index, world_size=1), self.spec)
        except ModelError:
            raise  # the folder cannot be loaded: the caller's error, not the group's
        except OutOfMemory as exc:
            raise GroupOutOfMemory(f"group {self.name}: {exc}", oom=exc, keep=False) from exc
        except Exception as exc:  # noqa: BLE001 - reported as the group's failure
            raise GroupFailure(f"group {self.name}: loading failed: {type(exc).__name__}: {exc}") from exc

    def _teardown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def arm_fault(self, fault: dict | None, *, rank: int = 0, persistent: bool = False) -> None:
        """Only ``raise`` and ``oom`` faults: an in-process rank cannot exit or hang without its
        driver."""
        if fault is not None and fault.get("action") not in ("raise", "oom"):
            raise ValueError("an in-process group takes only 'raise' and 'oom' faults (its rank is the driver)")
        super().arm_fault(fault, rank=rank, persistent=persistent)

    def _send(self, method: str, args: tuple, faults: list):
        if self.worker is None:
            raise GroupFailure(f"group {self.name} is not built")
        return method, args, faults[0]

    def _receive(self, handle, timeout_s: float) -> list:
        method, args, fault = handle
        try:
            return [self.worker.execute(method, args, fault)]
        except OutOfMemory as exc:  # the worker freed what it held: the group stays usable
            raise GroupOutOfMemory(f"group {self.name}: {exc}", oom=exc, keep=True) from exc
        except Exception as exc:  # noqa: BLE001 - the scheduler rebuilds and retries
            log.exception("group %s: %s failed", self.name, method)
            raise GroupFailure(f"group {self.name}: {method} raised {type(exc).__name__}: {exc}") from exc

    def _discard(self, handle) -> None:
        """A call never collected never ran: nothing to wait for."""
