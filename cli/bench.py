"""``relay bench NAME``: runs one of the benchmarks shipped in ``bench/`` (see :mod:`bench` for
the registry and the module interface), prints its table and writes its JSON result.

``relay bench all`` runs every registered bench that fits this machine, each with its own
defaults and the common flags given.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _module(name: str):
    """The bench's module, or ``None`` when its slot is registered but not built yet."""
    from relay.bench import BENCHES

    path = BENCHES[name][0]
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            return None
        raise


def add_parser(sub) -> None:
    """Registers ``relay bench`` (one sub-command per registered bench, and ``all``) on ``sub``."""
    from relay.bench import BENCHES
    from relay.bench.common import add_common_arguments

    p = sub.add_parser("bench", help="run a benchmark shipped with Relay (prints a table, writes JSON)",
                       description="Benchmarks shipped with Relay. Each prints a table and writes a JSON "
                                   "result (machine, device, versions, settings, raw timings); "
                                   "--smoke runs the smallest settings.")
    names = p.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, (_, description) in BENCHES.items():
        module = _module(name)
        q = names.add_parser(name, help=description if module else f"{description} [not built yet]",
                             description=description)
        add_common_arguments(q)
        if module is not None:
            module.add_arguments(q)
    q = names.add_parser("all", help="every bench that fits this machine, each with its defaults",
                         description="Runs every registered bench that fits this machine.")
    add_common_arguments(q)
    p.set_defaults(handler=run)


def run(args) -> int:
    """Runs ``relay bench``; returns the exit code."""
    if args.bench == "all":
        return _run_all(args)
    return _run_one(args.bench, args)


def _run_one(name: str, args) -> int:
    from relay.bench.common import SettingError, write_result

    module = _module(name)
    if module is None:
        print(f"relay bench {name}: not built yet (bench/{name}.py)", file=sys.stderr)
        return EXIT_FAILED
    reason = module.skip_reason(args)
    if reason:
        print(f"relay bench {name}: skipped: {reason}", flush=True)
        return EXIT_OK
    try:
        result = module.run(args)
    except SettingError as exc:
        print(f"relay bench {name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(result.table, flush=True)
    path = write_result(name, result, folder=args.results, json_path=args.json)
    print(f"wrote {path}", flush=True)
    return EXIT_OK


def _defaults_for(module, args) -> argparse.Namespace:
    """The bench's own defaults, with the common flags of ``relay bench all`` applied."""
    from relay.bench.common import add_common_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_common_arguments(parser)
    module.add_arguments(parser)
    own = parser.parse_args([])
    for name in ("smoke", "rounds", "results", "device"):
        setattr(own, name, getattr(args, name))
    return own


def _run_all(args) -> int:
    from relay.bench import BENCHES

    if args.json:
        print("relay bench all: error: --json names one file; use --results DIR", file=sys.stderr)
        return EXIT_USAGE
    outcome = {}
    for name in BENCHES:
        module = _module(name)
        if module is None:
            outcome[name] = "not built yet"
            continue
        own = _defaults_for(module, args)
        reason = module.skip_reason(own)
        if reason:
            print(f"relay bench {name}: skipped: {reason}", flush=True)
            outcome[name] = f"skipped ({reason})"
            continue
        print(f"== relay bench {name}", flush=True)
        try:
            code = _run_one(name, own)
        except Exception as exc:  # noqa: BLE001 - one failing bench must not hide the others
            print(f"relay bench {name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            code = EXIT_FAILED
        outcome[name] = "ok" if code == EXIT_OK else f"failed (exit {code})"
    print("== summary: " + ", ".join(f"{name} {state}" for name, state in outcome.items()), flush=True)
    return EXIT_FAILED if any(state.startswith("failed") for state in outcome.values()) else EXIT_OK
