"""What every bench shares: the common flags, machine and library metadata, the JSON result
file, small statistics helpers and the printed table.

Nothing heavy is imported at module level (see :mod:`bench`); torch is imported where needed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

def results_dir() -> Path:
    """Default folder of the result files, a user directory (never the installed package):
    ``$RELAY_RESULTS``, else ``$XDG_DATA_HOME/relay/bench``, else ``~/.local/share/relay/bench``.
    Results recorded for the repository go to ``bench/results`` (``--results bench/results``)."""
    if os.environ.get("RELAY_RESULTS"):
        return Path(os.environ["RELAY_RESULTS"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "relay" / "bench"


#: Distributions whose versions every result records (``None`` when not installed).
VERSION_PACKAGES = ("torch", "diffusers", "transformers", "xfuser", "grpcio", "ray")


class SettingError(ValueError):
    """A bench setting that cannot work; ``relay bench`` prints it and exits 2."""


@dataclass
class BenchResult:
    """What a bench's ``run`` returns.

    Attributes:
        settings: The settings it ran with (sizes, steps, rounds, dtype, ...).
        raw: Raw timings (every round, every repeat), JSON-serialisable.
        summary: The figures of merit (medians, ratios, percentiles).
        table: The printed table (title, header, rows, notes).
        device: The torch device the bench measured (``cpu``, ``cuda:0``), for the device name.
    """

    settings: dict
    raw: dict
    summary: dict
    table: str
    device: str = "cpu"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags every bench takes: ``--smoke``, ``--rounds``, ``--results``, ``--json``,
    ``--device``."""
    g = parser.add_argument_group("common bench options")
    g.add_argument("--smoke", action="store_true",
                   help="smallest settings (CI: seconds on a CPU); the figures mean little")
    g.add_argument("--rounds", type=int, help="measured rounds / repeats (default: the bench's own)")
    g.add_argument("--results", help="folder for the JSON result (default: $RELAY_RESULTS, else "
                                     "~/.local/share/relay/bench; bench/results records a run in the repository)")
    g.add_argument("--json", help="write the JSON result to this file instead")
    g.add_argument("--device", help="torch device, e.g. cuda:0 or cpu (default: cuda if present)")


def rounds(args, *, smoke: int, full: int) -> int:
    """The round count: ``--rounds`` if given, else the bench's smoke or full default."""
    if args.rounds is not None:
        if args.rounds < 1:
            raise SettingError(f"--rounds must be at least 1, got {args.rounds}")
        return args.rounds
    return smoke if args.smoke else full


def resolve_device(name: str | None):
    """``torch.device(name)``, or ``cuda`` when available and ``name`` is unset, else ``cpu``."""
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    """The CPU model and logical core count, e.g. ``Intel(R) Xeon(R) ... (2 cores)``."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} cores)"


def device_name(device) -> str:
    """Human name of a torch device: the GPU's name, or the CPU's."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device) -> str:
    """File-name part for a device: ``nvidia-h100-80gb-hbm3`` or ``cpu-2core``."""
    if str(device).startswith("cuda"):
        name = device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the figures, and of Python.

    Read from package metadata, not by importing (xfuser refuses to import without a GPU).
    """
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def result_document(name: str, result: BenchResult) -> dict:
    """The JSON document of one bench run (see the keys below)."""
    return {
        "bench": name,
        "machine": platform.platform(),
        "cpu": cpu_name(),
        "device": device_name(result.device),
        "device_type": str(result.device).split(":")[0],
        "versions": versions(),
        "settings": result.settings,
        "raw": result.raw,
        "summary": result.summary,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def result_path(name: str, result: BenchResult, folder: str | Path) -> Path:
    """``<folder>/<name>-<device slug>-<YYYYMMDD>[-smoke][-N].json``, never overwriting."""
    stem = f"{name}-{device_slug(result.device)}-{_dt.date.today():%Y%m%d}"
    if result.settings.get("smoke"):
        stem += "-smoke"
    folder = Path(folder)
    path, counter = folder / f"{stem}.json", 2
    while path.exists():
        path, counter = folder / f"{stem}-{counter}.json", counter + 1
    return path


def write_result(name: str, result: BenchResult, *, folder: str | Path | None = None,
                 json_path: str | None = None) -> Path:
    """Writes the JSON document to ``json_path`` or a new file in ``folder`` (default:
    :func:`results_dir`, read now).

    Returns:
        The path written.
    """
    path = Path(json_path) if json_path else result_path(name, result, folder or results_dir())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_document(name, result), indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# --- statistics ------------------------------------------------------------------------------
def median(values) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty sequence")
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def ratio_summary(numerators, denominators) -> dict:
    """Per-round ratios ``a / b`` of paired timings: median, min and max."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "per_round": ratios}


def timed(fn, device=None):
    """Runs ``fn()``; returns ``(seconds, result)``, synchronising CUDA around the call."""
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


# --- table ----------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list], *, title: str = "", notes: list[str] = (),
                 align: str = "") -> str:
    """A plain-text table.

    Args:
        headers: Column names.
        rows: Cells, used as given (format numbers before passing them); ``None`` prints ``-``.
        title: A line above the table.
        notes: Lines below the table.
        align: One letter per column, ``l`` or ``r``; default: the first column left, the
            others right.
    """
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row):
        parts = (cell.ljust(width) if side == "l" else cell.rjust(width)
                 for cell, width, side in zip(row, widths, align))
        return "  ".join(parts).rstrip()

    out = [title] if title else []
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(row) for row in cells[1:])
    out.extend(notes)
    return "\n".join(out)
