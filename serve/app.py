"""``relay serve``: load the models, start the gRPC server, serve until SIGTERM drains it."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from relay.engine.service import AsyncEngine
from relay.serve.server import RelayServer, ServerConfig

log = logging.getLogger(__name__)


def model_name(path: Path) -> str:
    """A served model's name: its folder name (``Wan2.2-T2V-A14B-Diffusers``)."""
    return path.name


async def serve(model_dirs: list[str], *, config: ServerConfig, runner_factory, max_queue: int = 8,
                heartbeat_s: float = 5.0, port_file: str | None = None, lora_dir: str | None = None,
                result_ttl_s: float = 3600.0, result_budget_bytes: int = 2 << 30,
                http_port: int | None = None, metrics_port: int | None = None,
                log_prompts: bool = False) -> None:
    """Runs the server until it has drained.

    Health is NOT_SERVING (and Generate answers UNAVAILABLE) until every model has loaded, and
    again while a model has a stage that no live worker group runs (:meth:`RelayServer.watch_capacity`).

    Args:
        runner_factory: ``runner_factory(info, name) -> runner`` builds each model's runner
            (called on a worker thread): an :class:`engine.scheduled.ScheduledRunner` over the
            model's executor, whose ``close()`` is called when the server stops.
        lora_dir: The folder requests name LoRA files in (``None``: no LoRAs).
        result_ttl_s, result_budget_bytes: How long, and how many bytes of, detached jobs'
            videos are kept for ``GetResult``.
        http_port: Also serve the HTTP videos API and the web page (:mod:`serve.http`) on this
            port (0: a free one), with the same tokens and TLS certificate; ``None``: gRPC only.
        metrics_port: Serve Prometheus metrics (:mod:`serve.metrics`, ``/metrics``) on this port
            (0: a free one); ``None``: none.
        log_prompts: Log each job's prompts when it is admitted (never otherwise).
    """
    from relay.engine.model_info import read_model_info

    infos = {}
    for directory in model_dirs:
        info = read_model_info(directory)
        infos[model_name(info.path)] = info
    runners: dict = {}
    engine = AsyncEngine(runners, default_model=next(iter(infos)), max_queue=max_queue,
                         heartbeat_s=heartbeat_s, lora_dir=lora_dir, result_ttl_s=result_ttl_s,
                         result_budget_bytes=result_budget_bytes, log_prompts=log_prompts)
    server = RelayServer(engine, infos, config)
    await server.start()
    server.install_signal_handlers()
    address = f"{config.host}:{server.port}"
    say(f"relay serve: listening on {address} ({'TLS' if config.tls_cert else 'plaintext'}"
         f"{', token auth' if config.tokens else ''}); loading {', '.join(infos)}")
    metrics = None
    if metrics_port is not None:
        from relay.serve.metrics import MetricsServer

        metrics = MetricsServer(config.host, metrics_port)
        say(f"relay serve: Prometheus metrics on http://{config.host}:{metrics.start()}/metrics")
    http = None
    if http_port is not None:
        from relay.serve.http import HttpServer

        http = HttpServer(engine, infos, host=config.host, port=http_port, tokens=config.tokens,
                          tls_cert=config.tls_cert, tls_key=config.tls_key)
        bound = await http.start()
        scheme = "https" if config.tls_cert else "http"
        say(f"relay serve: HTTP videos API and web page on {scheme}://{config.host}:{bound}/")
    if port_file:
        Path(port_file).write_text(f"{server.port}\n")
    try:
        for name, info in infos.items():
            runners[name] = await asyncio.to_thread(runner_factory, info, name)
        # Again: libraries started while loading (Ray's core worker) may install their own
        # SIGTERM handler, which would abort instead of draining.
        server.install_signal_handlers()
        engine.start()
        engine.ready = True
        await server.set_serving(True)
        say(f"relay serve: SERVING on {address}")
        watch = asyncio.ensure_future(server.watch_capacity())  # NOT_SERVING while a stage has no group
        try:
            await server.wait()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
    finally:
        if not server.stopped:  # a model failed to load: stop listening before the loop ends
            await server.server.stop(0)
        if http is not None:
            await http.stop()
        if metrics is not None:
            metrics.stop()
        for runner in runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
    say("relay serve: drained and stopped")


def say(message: str, *, level: int = logging.INFO) -> None:
    """A line of the server's own (listening, serving, drained, a failure to start): on stderr,
    or a log record when logs are JSON lines (so that every line parses)."""
    from relay.engine.logs import json_logging

    if json_logging():
        log.log(level, message.removeprefix("relay serve: "))
    else:
        print(message, file=sys.stderr, flush=True)
