"""Shared fixtures: tiny random Wan 2.2 models written in the diffusers layout, once per session,
and a helper that runs the ``relay`` CLI in-process and captures its exit code and stderr."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_attention_override(monkeypatch):
    """A developer's ``RELAY_ATTENTION`` (e.g. ``cuda-cudnn``) must not reach the tests: the
    commands read it, and a CUDA kernel on a CPU run is refused. Tests that want it set it."""
    monkeypatch.delenv("RELAY_ATTENTION", raising=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """``{"t2v": dir, "i2v": dir, "ti2v": dir}``: tiny models built by ``relay make-tiny``'s code."""
    from relay.engine.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny(root / kind, kind=kind, seed=0) for kind in ("t2v", "i2v", "ti2v")}


@pytest.fixture(scope="session")
def tiny_ltx2(tmp_path_factory) -> Path:
    """A tiny random LTX-2 (``relay make-tiny --kind ltx2``'s code), in the real diffusers layout."""
    from relay.engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ltx2") / "tiny-ltx2", kind="ti2v", family="ltx2")


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    """A 56x40 random RGB PNG (non-square, so resizing is exercised)."""
    from PIL import Image

    pixels = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class CliResult:
    """Exit code and captured streams of one in-process ``relay`` invocation."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def relay(capsys):
    """Runs ``relay ARGS...`` in this process (same code as the console script)."""
    from relay.cli.main import main

    def run(*args: str) -> CliResult:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def checkout_files() -> list[str]:
    """The files a clean checkout has (tracked, plus new files git does not ignore)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return [name for name in out if (REPO / name).is_file()]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of a clean checkout (no stale build folder, no
    dependencies, no network)."""
    source = tmp_path_factory.mktemp("checkout")
    for name in checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True, timeout=300)
    return next(out.glob("*.whl"))


def stop_server(proc, timeout_s: float = 60.0) -> None:
    """Stops a ``relay serve`` subprocess the way an orchestrator does: SIGTERM (a graceful
    drain), then SIGKILL if it has not exited within ``timeout_s``."""
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
