"""Prometheus metrics (``relay serve --metrics-port``): a real server, scraped after real
requests -- gRPC and HTTP, one refused, one unauthenticated, one whose worker process is killed
mid-request and retried on the rebuilt group -- with names, labels and counts checked against
what the requests' own run stats say.

The server is test_serve's ``LiveServer`` in its staged form (a high-noise and a low-noise group,
each its own worker process), so steps, hand-offs and a group rebuild all happen for real.
"""

from __future__ import annotations

import urllib.request

import grpc
import pytest

pytest.importorskip("prometheus_client")

TOKEN = "m3trics"
FAST = dict(height=32, width=32, frames=5, steps=4, seed=7, guidance=4.0, guidance_low=3.0, shift=5.0)


def _scrape(port: int) -> dict:
    """``{(sample name, frozenset(labels)): value}`` of one scrape of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _sum(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and want <= got)


@pytest.fixture(scope="module")
def served(tiny_models):
    from test_serve import LiveServer

    from relay.serve.metrics import MetricsServer

    metrics = MetricsServer("127.0.0.1", 0)
    port = metrics.start()
    live = LiveServer(tiny_models["t2v"], tokens=[TOKEN], staged=True)
    live.start_http()
    yield live, port
    live.stop()
    metrics.stop()


def test_a_scrape_after_real_requests_counts_them(served):
    import httpx

    from relay.serve.client import RelayClient
    from relay.serve.gen.relay.v1 import relay_pb2 as pb

    live, port = served
    name = live.name
    high, low = (group.name for group in live.executor.groups)
    stats = []
    with RelayClient(live.target, token=TOKEN) as client:
        stats.append(client.generate(pb.GenerateRequest(prompt="a kite", output_format=pb.OUTPUT_FORMAT_NPY,
                                                        **FAST)).done.stats)
        # The high-noise group's worker process exits at its first step: the group is rebuilt
        # and the request resumes from its checkpoint.
        live.executor.groups[0].arm_fault({"action": "exit", "method": "advance", "at_step": 1})
        stats.append(client.generate(pb.GenerateRequest(prompt="a boat", output_format=pb.OUTPUT_FORMAT_NPY,
                                                        **dict(FAST, seed=8))).done.stats)
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(pb.GenerateRequest(prompt="x", **dict(FAST, width=33)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with RelayClient(live.target, token="wrong") as stranger:
        with pytest.raises(grpc.RpcError) as unauthorised:
            stranger.list_models()
        assert unauthorised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with httpx.Client(base_url=live.http_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as web:
        video = web.post("/v1/videos", json={"prompt": "a train", "size": "32x32", "frames": 5, "steps": 4,
                                             "seed": 9, "guidance": 4.0, "guidance_low": 3.0, "shift": 5.0}).json()
        with web.stream("GET", f"/v1/videos/{video['id']}/events") as events:
            for line in events.iter_lines():
                if line.startswith("event: done"):
                    break
        assert web.get(f"/v1/videos/{video['id']}/content").status_code == 200
        assert web.get("/v1/videos/nope").status_code == 404
    assert live.wait_idle(60)
    job = live.call(lambda: live.engine.jobs[video["id"]])
    stats.append(job.stats)

    samples = _scrape(port)
    from google.protobuf.json_format import MessageToDict

    plain = [s if isinstance(s, dict) else MessageToDict(s) for s in stats]

    def expert_total(expert: str, key: str) -> float:
        return sum(float(s["experts"][expert][key]) for s in plain)

    assert _value(samples, "relay_requests_total", model=name, outcome="succeeded") == 3
    assert _value(samples, "relay_requests_total", model=name, outcome="rejected") == 1
    assert _value(samples, "relay_request_seconds_count", model=name) == 3
    assert _value(samples, "relay_queue_depth", model=name) == 0
    assert _value(samples, "relay_group_restarts_total", group=high) == 1
    assert _value(samples, "relay_group_restarts_total", group=low) == 0
    assert sum(float(s["retries"]) for s in plain) == 1
    for expert, group in (("high_noise", high), ("low_noise", low)):
        # Every step that ran, redone ones included, is in both the run stats and the metrics.
        assert _value(samples, "relay_forwards_total", expert=expert, kind="computed") == expert_total(expert, "forwards")
        assert _value(samples, "relay_step_seconds_count", group=group, expert=expert) == expert_total(expert, "steps")
        assert _value(samples, "relay_stage_busy_seconds_total", group=group) > 0
    assert _value(samples, "relay_forwards_total", expert="high_noise", kind="skipped") == 0
    assert _value(samples, "relay_handoff_bytes_total") > 3 * 5_000  # each request's state, high -> low
    method = "relay.v1.Relay/Generate"
    assert _value(samples, "relay_grpc_requests_total", method=method, code="OK") == 2
    assert _value(samples, "relay_grpc_requests_total", method=method, code="INVALID_ARGUMENT") == 1
    assert _value(samples, "relay_grpc_requests_total", method="relay.v1.Relay/ListModels", code="UNAUTHENTICATED") == 1
    assert _value(samples, "relay_grpc_request_seconds_count", method=method) == 3
    assert _value(samples, "relay_http_requests_total", route="/v1/videos", status="200") == 1
    assert _value(samples, "relay_http_requests_total", route="/v1/videos/{video_id}/events", status="200") == 1
    assert _value(samples, "relay_http_requests_total", route="/v1/videos/{video_id}", status="404") == 1
    # No label carries a prompt or a job id.
    labels = {value for (_, got) in samples for _, value in got}
    assert not any(word in value for value in labels for word in ("kite", "boat", "train", video["id"]))


def test_relay_serve_metrics_port(tmp_path):
    """``relay serve --metrics-port 0`` serves /metrics; a request shows up in it."""
    import re
    import subprocess
    import sys

    from relay.cli.main import main
    from relay.cli.service import _wait_serving

    port_file = tmp_path / "port"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--port", "0", "--port-file",
                                   str(port_file), "--metrics-port", "0"], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        port = _wait_serving(server, port_file, timeout_s=180)
        assert main(["submit", "--server", f"127.0.0.1:{port}", "--prompt", "x", "--steps", "2",
                     "--output", str(tmp_path / "x.npy"), "--quiet"]) == 0
        metrics_port = int(re.search(r"Prometheus metrics on http://[^:]+:(\d+)/metrics", log.read_text()).group(1))
        samples = _scrape(metrics_port)
        assert _sum(samples, "relay_requests_total", outcome="succeeded") == 1
        assert _sum(samples, "relay_grpc_requests_total", code="OK") >= 1
    finally:
        from conftest import stop_server

        stop_server(server)
