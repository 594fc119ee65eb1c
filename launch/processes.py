"""A worker group of spawned processes on this machine, one per device (the ``mp`` backend).

``relay generate --nproc N`` and every local multi-rank group: the driver spawns one process per
rank, each joins the group's ``torch.distributed`` world (NCCL on CUDA, gloo on CPU, rendezvous
on a free loopback port) and builds its :class:`~launch.worker.StageWorker`. Each rank has a pipe
to the driver: a control message (method, arguments) goes down, the result comes back. Tensors
in a message (a hand-off state, a checkpoint) are not copied through the pipe: torch's
multiprocessing pickler moves their storage to shared memory and sends a handle.

A rank that dies is seen at once (its process sentinel), a rank whose call raised is seen as
soon as it answers (its peers may be blocked in a collective: they are not waited for), and a
call past its deadline is the watchdog: each raises :class:`~engine.tickets.GroupFailure`, and
the scheduler rebuilds the whole group (every process is terminated and spawned again). An
out-of-memory error on a rank is a :class:`~engine.tickets.GroupOutOfMemory` (the group is kept
when it has one rank).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import time
import traceback

from relay.engine.errors import ModelError, OutOfMemory
from relay.engine.tickets import GroupFailure, GroupOutOfMemory
from relay.launch.group import CallGroup
from relay.launch.worker import WorkerSpec
from relay.parallel.groups import RankInfo, collect_released_groups

log = logging.getLogger(__name__)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_MODEL_ERROR = f"{ModelError.__module__}.{ModelError.__name__}:"


class _RankError:
    """A rank's answer when its call raised: the traceback, as text (and the
    :class:`~engine.errors.OutOfMemory` itself when that is what it was)."""

    def __init__(self, method: str, text: str, oom: OutOfMemory | None = None) -> None:
        self.method, self.text, self.oom = method, text, oom


def _error(method: str, exc: BaseException) -> _RankError:
    return _RankError(method, traceback.format_exc(), exc if isinstance(exc, OutOfMemory) else None)


def _rank_main(info: RankInfo, spec: WorkerSpec, conn) -> None:
    """A rank process: build the worker, then serve calls until the driver says stop."""
    _serve_rank(info, spec, conn)
    collect_released_groups()  # the worker is out of reach now (see the function)


def _serve_rank(info: RankInfo, spec: WorkerSpec, conn) -> None:
    from relay.launch.worker import StageWorker

    try:
        worker = StageWorker(info, spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver, then this rank ends
        conn.send(_error("setup", exc))
        return
    conn.send(os.getpid())
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the driver is gone
                break
            if message is None:
                break
            method, args, fault = message
            try:
                result = worker.execute(method, args, fault)
            except Exception as exc:  # noqa: BLE001 - the driver decides (it fails the group)
                result = _error(method, exc)
            conn.send(result)
    finally:
        worker.close()


class ProcessGroup(CallGroup):
    """A group of spawned rank processes (see the module docstring).

    Args:
        name: Group name.
        roles: Stages it runs.
        spec: What each rank loads.
        device_offset: The first CUDA device of the group: rank ``r`` uses ``cuda:<offset + r>``
            (several local groups share one machine's GPUs); ignored on a CPU.
        build_timeout_s: How long every rank may take to start and load.
    """

    backend = "mp"

    def __init__(self, *, name: str, roles: tuple[str, ...], spec: WorkerSpec, device_offset: int = 0,
                 build_timeout_s: float = 600.0) -> None:
        super().__init__(name=name, roles=roles, spec=spec)
        self.device_offset = device_offset
        self.build_timeout_s = build_timeout_s
        self.procs: list = []
        self.conns: list = []
        self.pids: list[int] = []
        self._failed = False  # a call failed: teardown does not wait for the ranks

    def _build(self) -> None:
        import torch.multiprocessing as torch_mp

        context = torch_mp.get_context("spawn")
        init = f"tcp://127.0.0.1:{free_port()}"
        for rank in range(self.size):
            parent, child = context.Pipe()
            info = RankInfo(rank=rank, local_rank=self.device_offset + rank, world_size=self.size, init_method=init)
            proc = context.Process(target=_rank_main, args=(info, self.spec, child), daemon=True,
                                   name=f"relay-{self.name}-rank{rank}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        try:
            self.pids = self._gather("setup", self.build_timeout_s)
        except (GroupFailure, ModelError):  # GroupOutOfMemory too: a half-loaded group is useless
            self._failed = True
            self._teardown()
            raise

    def _teardown(self) -> None:
        # A healthy group is asked to leave (each rank closes its process group); after a
        # failure a rank may be dead, blocked in a collective or stopped: no waiting for it.
        if not self._failed:
            for conn in self.conns:
                try:
                    conn.send(None)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + 10
            for proc in self.procs:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                try:
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped rank must run to take its SIGTERM
                except ProcessLookupError:
                    pass
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.pids, self._failed = [], [], [], False

    def _send(self, method: str, args: tuple, faults: list):
        if not self.conns:
            raise GroupFailure(f"group {self.name} is not built")
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((method, args, faults[rank]))
            except (OSError, ValueError) as exc:
                raise GroupFailure(f"group {self.name}: rank {rank} cannot be reached ({exc})") from None
        return method

    def _receive(self, handle, timeout_s: float) -> list:
        try:
            return self._gather(handle, timeout_s)
        except GroupOutOfMemory as exc:
            self._failed = not exc.keep
            raise
        except GroupFailure:
            self._failed = True
            raise

    def _gather(self, what: str, timeout_s: float) -> list:
        """Each rank's next answer; a dead rank, a rank error (at once: its peers may be blocked
        in a collective) or the deadline fails the group."""
        deadline = time.monotonic() + timeout_s
        results: dict[int, object] = {}
        waiting = dict(enumerate(self.conns))
        while waiting:
            sentinels = {self.procs[rank].sentinel: rank for rank in waiting}
            ready = multiprocessing.connection.wait([*waiting.values(), *sentinels],
                                                    timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise GroupFailure(f"group {self.name}: {what} exceeded its {timeout_s:.0f}s watchdog")
            for item in ready:
                rank = sentinels.get(item)
                if rank is None:
                    rank = next(r for r, c in waiting.items() if c is item)
                    try:
                        results[rank] = result = waiting.pop(rank).recv()
                    except (EOFError, OSError):
                        self.procs[rank].join(timeout=1.0)
                        raise GroupFailure(f"group {self.name}: rank {rank} died during {what} (exit code "
                                           f"{self.procs[rank].exitcode})") from None
                    if isinstance(result, _RankError):
                        self._raise(rank, result)
                elif rank in waiting and not waiting[rank].poll():
                    code = self.procs[rank].exitcode
                    hint = ""
                    if what == "setup" and code == -signal.SIGKILL:
                        hint = " (SIGKILL while loading: most often the kernel's out-of-memory killer)"
                    raise GroupFailure(f"group {self.name}: rank {rank} died during {what} (exit code {code})"
                                       f"{hint}")
        return [results[rank] for rank in range(self.size)]

    def _raise(self, rank: int, result: _RankError):
        """The group's error for a rank's failed call."""
        log.error("group %s rank %d: %s failed:\n%s", self.name, rank, result.method, result.text)
        if result.oom is not None:
            keep = self.size == 1 and result.method != "setup"
            raise GroupOutOfMemory(f"group {self.name}: {result.oom}", oom=result.oom, keep=keep)
        last = result.text.strip().splitlines()[-1]
        if result.method == "setup" and last.startswith(_MODEL_ERROR):
            raise ModelError(last[len(_MODEL_ERROR):].strip())  # the folder, not the group
        raise GroupFailure(f"group {self.name}: {result.method} raised on rank {rank}: {last}")
