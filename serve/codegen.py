"""Generates the Python gRPC stubs of ``proto/relay/v1/relay.proto`` into ``serve/gen``.

    .venv/bin/python -m relay.serve.codegen          # regenerate
    .venv/bin/python -m relay.serve.codegen --check  # exit 1 when the committed stubs are stale

The proto folder is mapped to the virtual import path ``relay/serve/gen`` so the generated
modules import each other as ``relay.serve.gen.relay.v1`` -- inside Relay's own namespace, never
a top-level ``proto`` package (that name belongs to Google's proto-plus).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO = "proto/relay/v1/relay.proto"
GENERATED = ("relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py")
TARGET = REPO / "serve" / "gen" / "relay" / "v1"
#: The import path the stubs are generated for (the repository root installs as ``relay``).
VIRTUAL = "relay/serve/gen"


def generate(out_root: Path) -> Path:
    """Runs protoc (grpcio-tools) with ``out_root`` as the output root; returns the stub folder."""
    from importlib import resources

    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{VIRTUAL}=proto", f"-I{well_known}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", PROTO.replace("proto/", VIRTUAL + "/", 1)]
    import os

    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + PROTO)
    finally:
        os.chdir(cwd)
    return out_root / VIRTUAL / "relay" / "v1"


def stale_files() -> list[str]:
    """Names of committed stub files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [name for name in GENERATED
                if not (TARGET / name).exists() or not filecmp.cmp(fresh / name, TARGET / name, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale stubs")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)} (run python -m relay.serve.codegen)", file=sys.stderr)
            return 1
        return 0
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        for name in GENERATED:
            shutil.copyfile(fresh / name, TARGET / name)
    print(f"generated {', '.join(GENERATED)} in {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
