"""`relay bench` (being built)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Registers `relay bench` on the subparsers ``sub``."""
    p = sub.add_parser("bench", help="(being built)")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Runs `relay bench`."""
    raise NotImplementedError("relay bench is being built")
