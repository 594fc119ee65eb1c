"""``relay bench cli``: how fast the command line answers -- ``relay --help``, ``relay --version``
and every ``relay X --help`` -- as whole processes, next to a bare interpreter start and an
``import torch`` for scale.

Each round runs every command once, in a rotated order (machine noise and caching hit all alike);
the figures are the median, minimum and maximum wall time over the rounds, and each command's
median over the bare interpreter's (what the CLI itself adds). The goal is under 0.3 s per help.
"""

from __future__ import annotations

import subprocess
import sys
import time

from relay.bench import common

#: The sub-commands whose ``--help`` is timed.
COMMANDS = ("generate", "resume", "serve", "submit", "demo", "make-tiny", "plan", "bench")
GOAL_S = 0.3


def add_arguments(parser) -> None:
    """The cli bench's flags (only the common ones)."""


def skip_reason(args) -> str | None:
    """Runs everywhere."""
    return None


def _cases() -> dict[str, list[str]]:
    relay = [sys.executable, "-m", "relay.cli"]
    cases = {"python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
             "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
             "relay --version": [*relay, "--version"], "relay --help": [*relay, "--help"]}
    cases.update({f"relay {name} --help": [*relay, name, "--help"] for name in COMMANDS})
    return cases


def _time(command: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return seconds


def run(args) -> common.BenchResult:
    """Times every case for ``--rounds`` rounds (default 10, smoke 2)."""
    rounds = common.rounds(args, smoke=2, full=10)
    cases = _cases()
    names = list(cases)
    raw = {name: [] for name in names}
    for name in names:  # one warm-up pass: the first start reads files from disk
        _time(cases[name])
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            raw[name].append(_time(cases[name]))
    base = common.median(raw[names[0]])
    summary = {name: {"median_s": common.median(v), "min_s": min(v), "max_s": max(v),
                      "over_interpreter": common.median(v) / base} for name, v in raw.items()}
    helps = [name for name in names if name.startswith("relay")]
    worst = max(summary[name]["median_s"] for name in helps)
    summary["_worst_relay_median_s"] = worst
    summary["_goal_met"] = worst < GOAL_S
    rows = [[name, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['max_s']:.3f}", f"{s['over_interpreter']:.2f}x"]
            for name, s in summary.items() if not name.startswith("_")]
    table = common.format_table(
        ["command", "median s", "min s", "max s", "vs interpreter"], rows,
        title=f"relay command-line start-up, {rounds} round(s), {common.cpu_name()}",
        notes=[f"slowest relay command: {worst:.3f}s median (goal < {GOAL_S}s: "
               f"{'met' if worst < GOAL_S else 'NOT met'})"])
    settings = {"rounds": rounds, "smoke": bool(args.smoke), "commands": names, "python": sys.executable}
    return common.BenchResult(settings=settings, raw=raw, summary=summary, table=table, device="cpu")
