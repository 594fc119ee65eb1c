"""Spawns a local worker group: N processes on this machine, one per device (or CPU slice).

The parent validates everything first, then starts ``N`` spawned processes that each call
:func:`launch.worker.run_generation` with their rank information (NCCL on CUDA, gloo on CPU,
rendezvous over a free loopback port). If any rank fails, the others are terminated at once:
a group cannot continue without every member.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import socket

from relay.launch.worker import GenerateJob, run_generation
from relay.parallel.groups import RankInfo


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(info: RankInfo, job: GenerateJob, results) -> None:
    results.put(run_generation(info, job))


def spawn_group(job: GenerateJob, nproc: int, *, timeout_s: float | None = None) -> list[dict]:
    """Runs ``job`` on ``nproc`` local processes and waits for all of them.

    Returns:
        Each rank's report (see :func:`launch.worker.run_generation`), ordered by rank.

    Raises:
        RuntimeError: when a rank exits with an error (the others are terminated) or the
            group outlives ``timeout_s``.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [context.Process(target=_entry, name=f"relay-rank{rank}", daemon=False,
                             args=(RankInfo(rank=rank, local_rank=rank, world_size=nproc, init_method=init),
                                   job, results))
             for rank in range(nproc)]
    for proc in procs:
        proc.start()
    reports, failed = [], None
    try:
        pending = {proc.sentinel: proc for proc in procs}
        while pending:
            ready = multiprocessing.connection.wait(list(pending), timeout=timeout_s)
            if not ready:
                failed = f"worker group exceeded {timeout_s}s"
                break
            for sentinel in ready:
                proc = pending.pop(sentinel)
                proc.join()
                if proc.exitcode != 0:
                    failed = f"{proc.name} exited with code {proc.exitcode}"
            if failed:
                break
            while not results.empty() and len(reports) < nproc:
                reports.append(results.get())
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failed:
        raise RuntimeError(failed)
    while len(reports) < nproc:
        reports.append(results.get(timeout=10))
    return sorted(reports, key=lambda report: report["rank"])
