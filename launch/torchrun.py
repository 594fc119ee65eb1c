"""``torchrun --nproc_per_node N -m relay.launch.torchrun generate <relay generate flags>``.

torchrun provides the rank information (the only place besides the local spawner that reads
``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``); the layout degrees come from the same flags as
``relay generate``, with the world size taken from torchrun. Every rank validates the request
(the same rules give the same verdict everywhere); rank 0's resolved request, seed included, is
broadcast to the others.
"""

from __future__ import annotations

import os
import sys

from relay.parallel.groups import RankInfo


def rank_info_from_env() -> RankInfo:
    """Rank information from torchrun's environment variables."""
    try:
        return RankInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]), init_method="env://")
    except KeyError as missing:
        raise SystemExit(f"launch.torchrun: {missing} is not set; start it with torchrun") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point: only the ``generate`` command runs under torchrun."""
    from relay.launch.cli import build_parser, quiet_libraries
    from relay.launch.commands import generate

    args = build_parser().parse_args(argv)
    if args.command != "generate":
        print("launch.torchrun: only `generate` runs under torchrun", file=sys.stderr)
        return 2
    info = rank_info_from_env()
    quiet_libraries()
    args.nproc = info.world_size
    args.quiet = args.quiet or info.rank != 0
    return generate(args, rank_info=info)


if __name__ == "__main__":
    sys.exit(main())
