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


# --- mp4 output -------------------------------------------------------------------------------
def _frames(seed: int = 0):
    import numpy as np

    rng = np.random.RandomState(seed)
    ramp = np.linspace(0, 1, 48 * 80 * 3, dtype=np.float32).reshape(48, 80, 3)
    return np.clip(ramp[None] + rng.randn(9, 48, 80, 3).astype(np.float32) * 0.1, 0, 1)


def test_mp4_bytes_are_deterministic_in_and_across_processes():
    """The same frames give the same bytes: encoded four at a time in parallel threads (which
    made 3-4 different files of 16 before the encoder's uninitialised reads were pinned down),
    one after another, and in two fresh processes."""
    import hashlib
    import io
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from relay.engine.video import encode_mp4

    frames = _frames()
    with ThreadPoolExecutor(4) as pool:
        parallel = set(pool.map(lambda _: hashlib.sha256(encode_mp4(frames, fps=16)).hexdigest(), range(16)))
    here = {hashlib.sha256(encode_mp4(frames, fps=16)).hexdigest() for _ in range(3)}
    code = ("import hashlib, io, numpy as np, sys\n"
            "from relay.engine.video import encode_mp4\n"
            "frames = np.load(io.BytesIO(sys.stdin.buffer.read()))\n"
            "print(hashlib.sha256(encode_mp4(frames, fps=16)).hexdigest())\n")
    buffer = io.BytesIO()
    np.save(buffer, frames)
    others = set()
    for _ in range(2):
        other = subprocess.run([sys.executable, "-c", code], input=buffer.getvalue(), capture_output=True,
                               timeout=120, cwd=REPO)
        assert other.returncode == 0, other.stderr
        others.add(other.stdout.decode().strip())
    assert len(parallel) == 1 and parallel == here == others


def test_mp4_is_faststart_and_tagged_bt709(tmp_path):
    import av
    import numpy as np

    from relay.engine.video import encode_mp4

    frames = _frames(1)
    data = encode_mp4(frames, fps=16)
    assert data.find(b"moov") < data.find(b"mdat"), "moov must come first (faststart)"
    path = tmp_path / "x.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        assert (codec.color_primaries, codec.color_trc, codec.colorspace) == (1, 1, 1)  # BT.709
        assert int(codec.color_range) == 1  # limited (MPEG) range
        decoded = np.stack([f.to_ndarray(format="rgb24", src_colorspace="ITU709", dst_colorspace="ITU709")
                            for f in container.decode(stream)])
    assert decoded.shape == (9, 48, 80, 3)
    # Right matrix both ways: the decoded colours match the input (a 601/709 mix-up shifts them).
    assert abs(decoded.astype(float).mean(axis=(0, 1, 2)) - frames.mean(axis=(0, 1, 2)) * 255).max() < 3


# --- bad ports, a missing GPU -------------------------------------------------------------------
@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_refuses_ports_outside_the_range(relay, tiny_models, port):
    result = relay("serve", "--model", tiny_models["t2v"], "--port", port)
    assert result.code == 2 and "error: --port: must be between 0 and 65535" in result.err, result.err


def test_serve_names_the_address_already_in_use(relay, tiny_models):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = relay("serve", "--model", tiny_models["t2v"], "--port", port)
    assert result.code == 2, result.err
    assert f"error: --port: 127.0.0.1:{port} is already in use" in result.err
    assert "Failed to bind" not in result.err and "internal error" not in result.err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cuda_without_cuda_exits_2_before_loading(relay, tiny_models, tmp_path, command):
    args = ["--model", tiny_models["t2v"], "--device", "cuda"]
    args += ["--prompt", "x", "--output", tmp_path / "x.npy"] if command == "generate" else ["--port", "0"]
    result = relay(command, *args)
    assert result.code == 2, result.err
    assert "error: --device: cuda is not available here" in result.err
    assert "Torch not compiled" not in result.err and "layout" not in result.err  # nothing was built


def test_i2v_photo_follows_its_exif_orientation(tiny_models):
    """A phone photo stored landscape with EXIF orientation 6 (rotate 90) is a portrait image."""
    import io

    from PIL import Image

    from relay.engine.model_info import read_model_info
    from relay.engine.request import GenerationRequest, resolve_request

    stored = Image.new("RGB", (80, 40), (200, 30, 30))
    exif = stored.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif)
    resolved = resolve_request(GenerationRequest(prompt="x", image=buffer.getvalue()), read_model_info(tiny_models["i2v"]))
    assert resolved.height > resolved.width  # portrait, as the photo is meant to be seen
