"""Relay installs under one ``relay`` namespace: nothing generic at the top level of site-packages."""

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC = ("engine", "parallel", "serve", "launch", "cli", "bench")


@pytest.mark.parametrize("name", GENERIC)
def test_packages_import_from_the_relay_namespace(name):
    import importlib

    module = importlib.import_module(f"relay.{name}")
    assert Path(module.__file__).resolve().parent == REPO / name


def test_wheel_installs_only_the_relay_namespace(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith("top_level.txt"))
        assert archive.read(top_level).decode().split() == ["relay"]
        assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"relay"}
        assert "relay/proto/relay/v1/relay.proto" in names  # every client generates from it
        for data in ("engine/models/wan/wan21_latent_rgb.json", "engine/models/wan/catalog.json",
                     "parallel/data/gpus.json", "parallel/data/calibration.json"):
            assert f"relay/{data}" in names, data
        assert not any(name.startswith("relay/tests/") or "/results/" in name for name in names)
        assert "relay/serve/web/index.html" in names  # the HTTP port's web page
        # Every module of the checkout ships (a package missing from pyproject would not), but
        # the ComfyUI node package, which is copied into ComfyUI, not installed with Relay.
        assert not any(name.startswith("relay/comfyui/") for name in names)
        shipped = {name for name in names if name.endswith(".py")}
        from conftest import checkout_files

        for name in checkout_files():
            if name.endswith(".py") and not name.startswith(("tests/", ".", "comfyui/")):
                assert f"relay/{name}" in shipped, name


def test_fresh_venv_imports_relay_engine_but_not_engine(wheel, tmp_path):
    """The wheel installed into a fresh virtual environment that sees the dependencies but not
    this checkout: ``import relay.engine`` works, ``import engine`` (and the other generic names)
    fails, and the ``relay`` console script answers."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch, diffusers, ...) from this environment; a path added by a .pth is
    # not a site folder, so its own .pth files (this checkout's editable finder) do not run.
    Path(site, "relay-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib, relay.engine.request, relay.cli.main\n"
            "assert relay.engine.request.__file__.startswith(SITE), relay.engine.request.__file__\n"
            "for name in ('engine', 'parallel', 'serve', 'launch', 'cli', 'bench'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit(f'{name} imported')\n"
            "print('ok')\n").replace("SITE", repr(site))
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    version = subprocess.run([str(venv / "bin" / "relay"), "--version"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("relay "), version.stderr


def test_cli_help_explains_every_generation_flag(relay):
    result = relay("generate", "--help")
    assert result.code == 0
    for flag in ("--model", "--prompt", "--negative-prompt", "--height", "--width", "--frames",
                 "--steps", "--seed", "--guidance", "--guidance-low", "--shift", "--boundary",
                 "--fps", "--image", "--dtype", "--output", "--stats", "--executor"):
        assert flag in result.out, flag
    top = relay("--help")
    assert all(cmd in top.out for cmd in ("generate", "resume", "make-tiny", "serve", "plan", "bench"))
