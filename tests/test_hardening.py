"""What a new user hit (issue 11): each case fails without its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY_TIMEOUT = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0123"


# --- Ray's local start timing out under load ---------------------------------------------------
def test_ray_start_is_retried_then_succeeds(monkeypatch):
    import ray

    from relay.launch import ray_group

    calls = []

    def flaky_init(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise RuntimeError(RAY_TIMEOUT)

    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_group.time, "sleep", lambda s: None)
    assert ray_group.connect() is True and len(calls) == 3


def test_ray_start_gives_up_with_a_clear_error(monkeypatch):
    import ray

    from relay.engine.tickets import GroupFailure
    from relay.launch import ray_group

    def failing_init(*args, **kwargs):
        raise RuntimeError(RAY_TIMEOUT)

    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_group.time, "sleep", lambda s: None)
    with pytest.raises(GroupFailure, match="a local Ray did not start after 3 tries .*gcs_server_port"):
        ray_group.connect()


def test_serve_exits_plainly_when_ray_never_starts(tiny_models, tmp_path):
    """``relay serve --executor ray`` when every Ray start times out: one error line, exit 1, no
    traceback and no 'Event loop is closed'."""
    guard = tmp_path / "site"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RELAY_TEST_RAY_FAILS'):\n"
        "    import ray\n"
        "    def init(*args, **kwargs):\n"
        f"        raise RuntimeError({RAY_TIMEOUT!r})\n"
        "    ray.init = init\n")
    env = dict(os.environ, RELAY_TEST_RAY_FAILS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "relay.cli", "serve", "--model", str(tiny_models["t2v"]),
                           "--port", "0", "--device", "cpu", "--executor", "ray"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "relay serve: error: a local Ray did not start after 3 tries" in proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr
