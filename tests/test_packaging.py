"""Relay installs under one ``relay`` namespace: nothing generic at the top level of site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC = ("engine", "parallel", "serve", "launch", "bench")


@pytest.mark.parametrize("name", GENERIC)
def test_packages_import_from_the_relay_namespace(name):
    import importlib

    module = importlib.import_module(f"relay.{name}")
    assert Path(module.__file__).resolve().parent == REPO / name


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``pip wheel .`` builds from this checkout (no dependencies, no network)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    return next(out.glob("*.whl"))


def test_wheel_installs_only_the_relay_namespace(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = next(n for n in names if n.endswith("top_level.txt"))
        assert archive.read(top_level).decode().split() == ["relay"]
        assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"relay"}
        assert "relay/proto/relay/v1/relay.proto" in names  # every client generates from it
        assert "relay/engine/data/wan21_latent_rgb.json" in names
        assert "relay/parallel/data/models.json" in names
        assert not any(name.startswith("relay/tests/") or "/results/" in name for name in names)


def test_installed_wheel_imports_relay_engine_but_not_engine(wheel, tmp_path):
    """The wheel installed into a fresh folder, imported by an isolated interpreter that has the
    dependencies but not this checkout (the editable finder is dropped): ``import engine`` fails."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    code = ("import importlib, sys\n"
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()\n"
            "                 and 'editable' not in getattr(f, '__name__', '').lower()]\n"
            "sys.path.insert(0, SITE)\n"
            "import relay.engine.request, relay.launch.cli\n"
            "assert relay.engine.request.__file__.startswith(SITE), relay.engine.request.__file__\n"
            "for name in ('engine', 'parallel', 'serve', 'launch', 'bench'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit(f'{name} imported')\n"
            "print('ok')\n").replace("SITE", repr(str(site)))
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_cli_help_explains_every_generation_flag(relay):
    result = relay("generate", "--help")
    assert result.code == 0
    for flag in ("--model", "--prompt", "--negative-prompt", "--height", "--width", "--frames",
                 "--steps", "--seed", "--guidance", "--guidance-low", "--shift", "--boundary",
                 "--fps", "--image", "--dtype", "--output"):
        assert flag in result.out, flag
    top = relay("--help")
    assert all(cmd in top.out for cmd in ("generate", "resume", "make-tiny"))
