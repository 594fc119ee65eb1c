"""A command line that answers at once: ``--help`` and ``--version`` without torch, and every
flag checked before torch, diffusers or Ray is imported.

The subprocesses below run with a PYTHONPATH folder whose ``torch``, ``diffusers`` and ``ray``
packages refuse to import: a command that reaches any of them fails with that message instead of
exiting 2 naming its flag. (How fast ``relay --help`` is, is a benchmark: ``relay bench cli``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POISON = "imported before every flag was checked"


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> dict:
    """An environment in which importing torch, diffusers or ray raises."""
    folder = tmp_path_factory.mktemp("poison")
    for name in ("torch", "diffusers", "ray"):
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} {POISON}')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))


def _relay(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_the_poison_works(poisoned):
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=poisoned, capture_output=True, text=True)
    assert proc.returncode == 1 and POISON in proc.stderr


@pytest.mark.parametrize("command", [[], ["generate"], ["resume"], ["serve"], ["submit"], ["demo"],
                                     ["make-tiny"], ["plan"], ["bench"], ["bench", "parallel"]])
def test_help_needs_no_torch(poisoned, command):
    proc = _relay(poisoned, *command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: relay" in proc.stdout


def test_version(poisoned):
    from relay import __version__

    proc = _relay(poisoned, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"relay {__version__}"


@pytest.mark.parametrize("flags, field", [
    (["--steps", "0"], "--steps"),
    (["--height", "33"], "--height"),
    (["--frames", "8"], "--frames"),
    (["--guidance", "30"], "--guidance"),
    (["--shift", "0"], "--shift"),
    (["--boundary", "1.5"], "--boundary"),
    (["--seed", "-2"], "--seed"),
    (["--fps", "0"], "--fps"),
    (["--image", "x.png"], "--image"),
    (["--output", "x.gif"], "--output"),
    (["--stats", "x.txt"], "--stats"),
    (["--device", "tpu"], "--device"),
    (["--nproc", "3", "--ulysses", "3"], "--ulysses"),
    (["--nproc", "2", "--fsdp", "3"], "--fsdp"),
    (["--layout", "tensor=2"], "--layout"),
    (["--placement", "staged", "--stage-split", "1:x"], "--stage-split"),
    (["--placement", "staged", "--high-layout", "ulysses=q"], "--high-layout"),
    (["--executor", "torchrun", "--placement", "staged"], "--executor"),
    (["--ray-address", "auto"], "--ray-address"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--step-timeout", "0"], "--step-timeout"),
    (["--checkpoint-at", "99", "--checkpoint-dir", "ck"], "--checkpoint-at"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_every_generate_flag_is_checked_before_torch(poisoned, tiny_models, flags, field, tmp_path):
    args = ["generate", "--prompt", "a cat", "--output", tmp_path / "x.npy"]
    if "--model" not in flags:
        args += ["--model", tiny_models["t2v"]]
    proc = _relay(poisoned, *args, *flags)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {field}:" in proc.stderr and POISON not in proc.stderr, proc.stderr


@pytest.mark.parametrize("command, flags, field", [
    ("serve", ["--ulysses", "3", "--nproc", "3"], "--ulysses"),
    ("serve", ["--token", "@/nonexistent/tokens"], "--token"),
    ("serve", ["--tls-cert", "c.pem"], "--tls-cert"),
    ("serve", ["--executor", "torchrun", "--replicas", "2"], "--executor"),
    ("resume", ["/nonexistent/step.pt", "--output", "x.gif"], "--output"),
])
def test_serve_and_resume_flags_are_checked_before_torch(poisoned, tiny_models, command, flags, field):
    proc = _relay(poisoned, command, "--model", tiny_models["t2v"], *flags)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {field}:" in proc.stderr and POISON not in proc.stderr, proc.stderr


def test_valid_flags_go_on_to_the_libraries(poisoned, tiny_models, tmp_path):
    """Control: with valid flags the command does reach the libraries (the poison fires), so
    the cases above were refused by the flag checks, not by luck."""
    proc = _relay(poisoned, "generate", "--model", tiny_models["t2v"], "--prompt", "a cat", "--output",
                  tmp_path / "x.npy")
    assert proc.returncode != 0 and POISON in proc.stderr


def test_no_progress_bar_when_stderr_is_not_a_terminal(tiny_models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "generate", "--model", str(tiny_models["t2v"]),
                           "--prompt", "a cat", "--steps", "3", "--height", "32", "--width", "32", "--frames", "5",
                           "--output", str(tmp_path / "x.npy")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "step/s" not in proc.stderr and "it/s" not in proc.stderr
    assert "denoised 3 step(s)" in proc.stderr
