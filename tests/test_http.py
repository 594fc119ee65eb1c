"""The HTTP videos API (:mod:`serve.http`): a real server over loopback, driven with httpx.

The server is the same as in test_serve.py (a stage scheduler over an in-process group, the
gRPC server) with the HTTP API started beside it on the same event loop; the reference video is
``relay generate``'s for the same settings.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")

TOKEN = "s3cret"
FAST = dict(size="48x32", seconds="0.5", fps=8, steps=4, seed=7, guidance=4.0, guidance_low=3.0, shift=5.0)
PROMPT = "a red kite over the sea"


@pytest.fixture(scope="module")
def server(tiny_models):
    from test_serve import LiveServer

    live = LiveServer(tiny_models["t2v"], max_queue=1, tokens=[TOKEN])
    live.start_http()
    yield live
    live.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


def _events(client, video_id):
    """The server-sent events of a job: ``[(kind, data)]`` until its terminal event."""
    out = []
    with client.stream("GET", f"/v1/videos/{video_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
                if kind in ("done", "failed", "cancelled"):
                    break
    return out


def _frames(mp4: bytes) -> np.ndarray:
    import imageio.v3 as iio

    return np.stack(list(iio.imiter(io.BytesIO(mp4), extension=".mp4")))


def test_create_stream_download_equals_relay_generate(client, tiny_models, relay, tmp_path):
    created = client.post("/v1/videos", json=dict(FAST, prompt=PROMPT))
    assert created.status_code == 200, created.text
    video = created.json()
    assert video["object"] == "video" and video["status"] in ("queued", "in_progress") and video["frames"] == 5
    events = _events(client, video["id"])
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and "preview" in kinds
    progress = [data["progress"] for kind, data in events if kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100
    preview = next(data for kind, data in events if kind == "preview")
    assert base64.b64decode(preview["png"]).startswith(b"\x89PNG")
    status = client.get(f"/v1/videos/{video['id']}").json()
    assert status["status"] == "completed" and status["progress"] == 100 and status["has_content"]
    content = client.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"

    out = tmp_path / "ref.mp4"
    result = relay("generate", "--model", tiny_models["t2v"], "--prompt", PROMPT, "--width", "48", "--height", "32",
                   "--frames", "5", "--fps", "8", "--steps", "4", "--seed", "7", "--guidance", "4",
                   "--guidance-low", "3", "--shift", "5", "--dtype", "fp32", "--device", "cpu", "--quiet",
                   "--output", out)
    assert result.code == 0, result.err
    ours, reference = _frames(content.content), _frames(out.read_bytes())
    assert ours.shape == reference.shape == (5, 32, 48, 3)
    np.testing.assert_array_equal(ours, reference)


def test_cancel_overload_and_errors(server, client):
    long = dict(FAST, steps=300, size="64x64")
    first = client.post("/v1/videos", json=dict(long, prompt=PROMPT)).json()
    second = client.post("/v1/videos", json=dict(long, prompt=PROMPT)).json()  # the one queue place
    third = client.post("/v1/videos", json=dict(FAST, prompt=PROMPT))
    assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
    assert client.delete(f"/v1/videos/{second['id']}").json()["status"] == "cancelled"  # queued: at once
    client.delete(f"/v1/videos/{first['id']}")
    events = _events(client, first["id"])
    assert events[-1][0] == "cancelled"
    assert client.get(f"/v1/videos/{first['id']}").json()["status"] == "cancelled"
    gone = client.get(f"/v1/videos/{first['id']}/content")
    assert gone.status_code == 409 and gone.json()["error"]["field"] == "id"

    bad = client.post("/v1/videos", json=dict(FAST, prompt=PROMPT, size="48by32"))
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "size"
    odd = client.post("/v1/videos", json=dict(FAST, prompt=PROMPT, seconds="0.3"))
    assert odd.status_code == 400 and odd.json()["error"]["field"] == "seconds"
    rule = client.post("/v1/videos", json=dict(FAST, prompt=PROMPT, size="50x32"))  # the model's rules
    assert rule.status_code == 400 and rule.json()["error"]["field"] == "width"
    unknown = client.post("/v1/videos", json=dict(FAST, prompt=PROMPT, colour="red"))
    assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "colour"
    assert client.get("/v1/videos/nosuchvideo").status_code == 404
    assert client.get("/v1/videos/nosuchvideo").json()["error"]["field"] == "id"
    with httpx.Client(base_url=server.http_url) as anonymous:
        refused = anonymous.post("/v1/videos", json=dict(FAST, prompt=PROMPT))
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]
        assert "<title>Relay</title>" in anonymous.get("/").text
    assert server.wait_idle()
