"""Worker groups under ``torchrun`` (the ``torchrun`` backend, an external launcher).

torchrun starts every rank itself; each runs ``python -m relay.launch.torchrun JOB``, where JOB
is a :class:`TorchrunJob` file the driver wrote after validating everything (nothing is parsed
from the command line on a rank). Every rank reads its rank information from torchrun's
environment (the only place besides the executors that reads ``RANK`` / ``LOCAL_RANK`` /
``WORLD_SIZE``), builds its :class:`~launch.worker.StageWorker` and joins a gloo control group.
Rank 0 is also the driver: it runs the job's driver function with an executor whose one group is
a :class:`TorchrunGroup` -- its own worker plus the others, reached over the control group --
under the same stage scheduler as every other backend. The other ranks follow: they execute each
call rank 0 broadcasts, send their results back, and exit when rank 0 closes the group.

torchrun cannot restart a rank, so a group failure here is final (the group is retired and its
requests fail); the watchdog is the collective timeout.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass

from relay.engine.errors import OutOfMemory
from relay.engine.tickets import GroupFailure, GroupOutOfMemory
from relay.launch.group import CallGroup
from relay.launch.worker import StageWorker, WorkerSpec
from relay.parallel.groups import RankInfo, collect_released_groups

log = logging.getLogger(__name__)

#: How long a follower may wait for rank 0's next call (a service may idle for days).
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True, kw_only=True)
class TorchrunJob:
    """Everything the ranks of a torchrun job need, written once by the driver (picklable).

    Attributes:
        placement: The :class:`~launch.placement.Placement` (one group).
        spec: What each rank loads.
        config: The scheduler policy.
        driver: ``"module:function"`` rank 0 runs as ``function(executor, payload)``; its return
            value is the job's exit code.
        payload: The driver's argument (e.g. the resolved request and output path).
        pid_file: Where rank 0 writes its pid once it drives (the launcher sends it SIGTERM
            there, so a service drains), or ``None``.
    """

    placement: object
    spec: WorkerSpec
    config: object
    driver: str
    payload: object
    pid_file: str | None = None

    def save(self, path) -> None:
        """Writes the job (pickle; the file is the driver's own, in a private folder)."""
        with open(path, "wb") as file:
            pickle.dump(self, file)

    @staticmethod
    def load(path) -> TorchrunJob:
        """Reads a job written by :meth:`save`."""
        with open(path, "rb") as file:
            return pickle.load(file)


def rank_info_from_env() -> RankInfo:
    """Rank information from torchrun's environment variables."""
    try:
        return RankInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]), init_method="env://")
    except KeyError as missing:
        raise SystemExit(f"relay.launch.torchrun: {missing} is not set; start it with torchrun") from None


class _RankError:
    def __init__(self, text: str, oom=None) -> None:
        self.text, self.oom = text, oom


class TorchrunGroup(CallGroup):
    """The torchrun world as one group, driven from rank 0 (see the module docstring).

    Args:
        name: Group name.
        roles: Stages it runs.
        spec: What each rank loaded.
        worker: Rank 0's own worker.
        control: The gloo control group over every rank.
    """

    backend = "torchrun"
    #: torchrun owns the ranks: an idle group that froze could not be rebuilt anyway.
    health_checked = False
    #: A lost torchrun rank is gone for good: nothing to build again.
    rejoins = False

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec, worker: StageWorker, control) -> None:
        super().__init__(name=name, roles=roles, spec=spec)
        self.worker = worker
        self.control = control
        self.builds = 1

    def _build(self) -> None:
        raise GroupFailure(f"group {self.name}: torchrun cannot restart its ranks; the job must be relaunched")

    def restart(self) -> None:
        """Refused: torchrun owns the rank processes."""
        self._build()

    def _teardown(self) -> None:
        import torch.distributed as dist

        if self.worker is None:
            return
        dist.broadcast_object_list([None], src=0, group=self.control)  # the followers stop
        self.worker.close()
        self.worker = None

    def _send(self, method: str, args: tuple, faults: list):
        import torch.distributed as dist

        if self.worker is None:
            raise GroupFailure(f"group {self.name} is closed")
        dist.broadcast_object_list([(method, args, faults)], src=0, group=self.control)
        try:
            mine = self.worker.execute(method, args, faults[0])
        except Exception as exc:  # noqa: BLE001 - the others still answer; then the group fails
            mine = _RankError(traceback.format_exc(), exc if isinstance(exc, OutOfMemory) else None)
        results = [None] * self.size
        dist.gather_object(mine, results, dst=0, group=self.control)
        return method, results

    def _receive(self, handle, timeout_s: float) -> list:
        method, results = handle
        for rank, result in enumerate(results):
            if isinstance(result, _RankError):
                log.error("group %s rank %d: %s failed:\n%s", self.name, rank, method, result.text)
                if result.oom is not None:  # one rank: it freed its memory; more: peers may be lost
                    raise GroupOutOfMemory(f"group {self.name}: {result.oom}", oom=result.oom,
                                           keep=self.size == 1)
                last = result.text.strip().splitlines()[-1]
                raise GroupFailure(f"group {self.name}: {method} raised on rank {rank}: {last}")
        return results


def follow(worker: StageWorker, control) -> None:
    """A follower rank: executes every call rank 0 broadcasts until it closes the group."""
    import torch.distributed as dist

    rank = dist.get_rank()
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        if box[0] is None:
            return
        method, args, faults = box[0]
        try:
            result = worker.execute(method, args, faults[rank])
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the group
            result = _RankError(traceback.format_exc(), exc if isinstance(exc, OutOfMemory) else None)
        dist.gather_object(result, None, dst=0, group=control)


def _resolve(driver: str):
    module, _, name = driver.partition(":")
    return getattr(importlib.import_module(module), name)


def run_job(job: TorchrunJob, info: RankInfo) -> int:
    """Runs ``job`` on this rank (see the module docstring); returns the exit code."""
    import torch.distributed as dist

    from relay.launch.executor import Executor

    plan = job.placement.groups[0]
    if len(job.placement.groups) != 1 or plan.devices != info.world_size:
        raise SystemExit(f"relay.launch.torchrun: the job needs one group of {plan.devices} ranks; "
                         f"torchrun started {info.world_size}")
    if info.world_size == 1 and not dist.is_initialized():  # a group of one joins no world itself
        dist.init_process_group("gloo", init_method=info.init_method, rank=0, world_size=1)
    worker = StageWorker(info, job.spec)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    if info.rank != 0:
        # Rank 0 decides when the group ends (a service drains first); torchrun passes a SIGTERM
        # to every rank, so the followers leave it to rank 0 and exit when it closes the group.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        try:
            follow(worker, control)
        finally:
            worker.close()
        return 0
    group = TorchrunGroup(name=plan.name, roles=plan.roles, spec=job.spec, worker=worker, control=control)
    if job.pid_file:
        with open(job.pid_file, "w") as file:
            file.write(str(os.getpid()))
    with Executor.from_groups(job.placement, [group], config=job.config) as executor:
        return int(_resolve(job.driver)(executor, job.payload) or 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m relay.launch.torchrun JOB`` on every rank (started by torchrun)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: torchrun ... -m relay.launch.torchrun JOB (written by relay generate/serve "
              "--executor torchrun)", file=sys.stderr)
        return 2
    return run_job(TorchrunJob.load(argv[0]), rank_info_from_env())


if __name__ == "__main__":
    code = main()
    collect_released_groups()  # the worker is out of reach now (see the function)
    sys.exit(code)
