"""The generic top-level package names must resolve to this repository, not to site-packages."""

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["engine", "parallel", "serve", "launch"])
def test_top_level_packages_come_from_this_repo(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_cli_help_explains_every_generation_flag(relay):
    result = relay("generate", "--help")
    assert result.code == 0
    for flag in ("--model", "--prompt", "--negative-prompt", "--height", "--width", "--frames",
                 "--steps", "--seed", "--guidance", "--guidance-low", "--shift", "--boundary",
                 "--fps", "--image", "--dtype", "--output"):
        assert flag in result.out, flag
    top = relay("--help")
    assert all(cmd in top.out for cmd in ("generate", "resume", "make-tiny"))
