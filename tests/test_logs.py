"""Structured logs (``relay serve --log-format json``): a real server's stderr, line by line --
every log line one JSON object, the request id on every line about a request, the prompt never
(and in the admission line only with ``--log-prompts``)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import grpc
import pytest

PROMPT = "a lighthouse keeper's secret garden at dawn"
#: Lines the gRPC C core writes to stderr itself (not Python logging), e.g. ``I1203 18:25:28.0 ...``.
GRPC_CORE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")
TEXT_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _serve_and_submit(tmp_path, *flags) -> tuple[list[str], str]:
    from relay.cli.service import _wait_serving
    from relay.serve.client import RelayClient
    from relay.serve.gen.relay.v1 import relay_pb2 as pb

    port_file, err = tmp_path / "port", tmp_path / "serve.err"
    with open(err, "w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--port", "0", "--port-file",
                                   str(port_file), "--log-format", "json", *flags], stdout=subprocess.DEVNULL,
                                  stderr=stderr, start_new_session=True)
    try:
        port = _wait_serving(server, port_file, timeout_s=180)
        with RelayClient(f"127.0.0.1:{port}") as client:
            job_id = client.generate(pb.GenerateRequest(prompt=PROMPT, steps=2)).job_id
            with pytest.raises(grpc.RpcError):
                client.generate(pb.GenerateRequest(prompt=PROMPT, width=33))
    finally:
        from conftest import stop_server

        stop_server(server)
    return err.read_text().splitlines(), job_id


@pytest.mark.parametrize("log_prompts", [False, True])
def test_json_lines_with_the_request_id_and_no_prompt(tmp_path, log_prompts):
    lines, job_id = _serve_and_submit(tmp_path, *(["--log-prompts"] if log_prompts else []))
    records = []
    for line in lines:
        if not line.strip() or GRPC_CORE.match(line):
            continue
        assert not TEXT_LOG.match(line), f"a text log line: {line}"
        records.append(json.loads(line))  # every other line is one JSON object
    assert records and all({"ts", "level", "logger", "message", "pid"} <= set(r) for r in records)
    mine = [r for r in records if r.get("request_id") == job_id]
    messages = " | ".join(r["message"] for r in mine)
    assert "admitted" in messages and "started" in messages and "succeeded" in messages, messages
    # Every line that names the job carries its id.
    assert all(r.get("request_id") == job_id for r in records if job_id in r["message"])
    assert any("SERVING on" in r["message"] for r in records)  # the server's own lines are records too
    with_prompt = [r for r in records if "lighthouse" in json.dumps(r)]
    if log_prompts:
        assert len(with_prompt) == 1 and "admitted" in with_prompt[0]["message"]
    else:
        assert not with_prompt


def test_request_ids_follow_the_context_into_threads(caplog):
    """The id set for a request is on the records of code working on it, also on a worker thread
    started from there (asyncio.to_thread copies the context), and on no other record."""
    import asyncio

    from relay.engine.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, request_context

    log = logging.getLogger("relay.test")
    handler = logging.Handler()
    seen = []
    handler.emit = lambda record: seen.append(json.loads(JsonFormatter().format(record)))
    handler.addFilter(RequestIdFilter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        async def job():
            REQUEST_ID.set("job-1")
            await asyncio.to_thread(log.info, "on the worker thread")

        asyncio.run(job())
        with request_context("job-2"):
            log.info("inside", extra={"group": "fused0"})
        log.info("outside")
    finally:
        log.removeHandler(handler)
    assert [(r["message"], r.get("request_id")) for r in seen] == [
        ("on the worker thread", "job-1"), ("inside", "job-2"), ("outside", None)]
    assert seen[1]["group"] == "fused0"
