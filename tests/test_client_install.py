"""The studio install, ``wan-relay[client]``: the wheel installed with its client extra into a
fresh virtual environment that cannot see this one (so no torch, no Ray), driving a real server.

The environment gets its dependencies from the package index (pip's cache on a machine that has
run ``make install``); what it must *not* get is checked by importing: torch, Ray, diffusers and
the HTTP server stack are absent, yet ``relay submit`` / ``relay fetch`` and both Python clients
work, and their videos equal ``relay generate``'s for the same settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

PROMPT = "a red kite over the sea"
SETTINGS = ("--width", "48", "--height", "32", "--frames", "5", "--steps", "3", "--seed", "11",
            "--guidance", "4", "--guidance-low", "3", "--shift", "5")
ENGINE_ONLY = ("torch", "ray", "diffusers", "transformers", "xfuser", "fastapi", "uvicorn", "numpy", "PIL")


@pytest.fixture(scope="module")
def client_env(wheel, tmp_path_factory):
    """``bin/`` of a fresh venv holding ``wheel[client]`` and what its metadata pulls in."""
    venv = tmp_path_factory.mktemp("studio") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", f"{wheel}[client]"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin"


@pytest.fixture(scope="module")
def server(tiny_models):
    from test_serve import LiveServer

    live = LiveServer(tiny_models["t2v"], tokens=["studio"])
    live.start_http()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> np.ndarray:
    """``relay generate``'s frames for SETTINGS (this environment, in-process)."""
    from relay.cli.main import main

    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    assert main(["generate", "--model", str(tiny_models["t2v"]), "--prompt", PROMPT, *SETTINGS,
                 "--dtype", "fp32", "--output", str(out)]) == 0
    return np.load(out)


def _run(bin_dir, *args, timeout=300):
    return subprocess.run([str(a) for a in args], cwd=bin_dir.parent, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": str(bin_dir), "HOME": str(bin_dir.parent)})


def test_client_install_has_no_engine(client_env):
    probe = textwrap.dedent(f"""
        import importlib, json
        absent = []
        for name in {ENGINE_ONLY!r}:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                absent.append(name)
        import relay.cli.main, relay.serve.client, relay.serve.http_client
        print(json.dumps(absent))
    """)
    out = _run(client_env, client_env / "python", "-c", probe)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == list(ENGINE_ONLY)
    # A command that needs the engine says which install it needs, in one line.
    generate = _run(client_env, client_env / "relay", "generate", "--prompt", "x", "--output", "x.mp4")
    assert generate.returncode == 1 and "wan-relay[engine]" in generate.stderr, generate.stderr
    assert "Traceback" not in generate.stderr


def test_client_install_submits_and_fetches_over_grpc(client_env, server, reference, tmp_path):
    streamed = tmp_path / "streamed.npy"
    out = _run(client_env, client_env / "relay", "submit", "--server", server.target, "--token", "studio",
               "--prompt", PROMPT, *SETTINGS, "--output", streamed, "--quiet")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.load(streamed), reference)

    detached = _run(client_env, client_env / "relay", "submit", "--server", server.target, "--token", "studio",
                    "--prompt", PROMPT, *SETTINGS, "--output", tmp_path / "later.npy", "--detach", "--quiet")
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    fetched = _run(client_env, client_env / "relay", "fetch", job_id, "--server", server.target, "--token",
                   "studio", "--output", tmp_path / "later.npy", "--quiet")
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "later.npy").read_bytes() == streamed.read_bytes()

    refused = _run(client_env, client_env / "relay", "submit", "--server", server.target, "--token", "studio",
                   "--prompt", PROMPT, "--width", "50", "--output", tmp_path / "bad.npy", "--quiet")
    assert refused.returncode == 2 and "width" in refused.stderr, refused.stderr


def test_client_install_http_client(client_env, server, reference, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from relay.serve.http_client import RelayError, RelayHttp

        client = RelayHttp({server.http_url!r}, token="studio")
        job = client.create(dict(prompt={PROMPT!r}, size="48x32", frames=5, steps=3, seed=11, guidance=4.0,
                                 guidance_low=3.0, shift=5.0, output_format="npy"))
        kinds = [kind for kind, _ in client.events(job["id"])]
        assert kinds[-1] == "done", kinds
        assert client.get(job["id"])["status"] == "completed"
        open(sys.argv[1], "wb").write(client.content(job["id"]))
        try:
            RelayHttp({server.http_url!r}, token="wrong").get(job["id"])
        except RelayError as exc:
            assert exc.status == 401, exc
        else:
            raise SystemExit("no 401")
    """)
    out = _run(client_env, client_env / "python", "-c", script, tmp_path / "http.npy")
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "http.npy"), reference)
