"""`relay plan` (being built)."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Registers `relay plan` on the subparsers ``sub``."""
    p = sub.add_parser("plan", help="(being built)")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Runs `relay plan`."""
    raise NotImplementedError("relay plan is being built")
