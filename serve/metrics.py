"""The Prometheus exporter of Relay's metrics (``relay serve --metrics-port``).

:class:`PrometheusSink` is a sink of :data:`engine.metrics.RECORDER`: it declares every metric of
:data:`engine.metrics.DEFINITIONS` in its own ``prometheus_client`` registry and applies each
record. :class:`MetricsServer` serves that registry over HTTP (``/metrics``, the text exposition
format) on its own port, so a scrape never waits behind the gRPC or HTTP front ends.
:class:`GrpcMetrics` is the gRPC server interceptor and :class:`HttpMetrics` the HTTP API's
middleware that record the front ends' own requests.
"""

from __future__ import annotations

import time

import grpc

from relay.engine.metrics import COUNTER, GAUGE, RECORDER


class PrometheusSink:
    """Relay's metrics as ``prometheus_client`` metrics in ``registry`` (a fresh one by default).

    Args:
        registry: The ``CollectorRegistry`` to declare the metrics in.
    """

    def __init__(self, registry=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from relay.engine.metrics import DEFINITIONS

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._metrics = {}
        for name, metric in DEFINITIONS.items():
            if metric.kind == COUNTER:
                # prometheus_client appends _total to a counter's name itself
                made = Counter(name.removesuffix("_total"), metric.help, metric.labels, registry=self.registry)
            elif metric.kind == GAUGE:
                made = Gauge(name, metric.help, metric.labels, registry=self.registry)
            else:
                made = Histogram(name, metric.help, metric.labels, buckets=metric.buckets, registry=self.registry)
            self._metrics[name] = made

    def record(self, metric, op: str, value: float, labels: dict) -> None:
        """Applies one record of :data:`engine.metrics.RECORDER`."""
        target = self._metrics[metric.name]
        if metric.labels:
            target = target.labels(**labels)
        getattr(target, op)(value)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what a scrape gets)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsServer:
    """Serves a :class:`PrometheusSink` attached to the recorder on ``host:port`` (0: a free port).

    Args:
        host: Listen address.
        port: Listen port.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.requested_port = host, port
        self.sink = PrometheusSink()
        self._server = self._thread = None
        self.port = None

    def start(self) -> int:
        """Attaches the sink and starts serving; returns the bound port."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(self.requested_port, addr=self.host,
                                                       registry=self.sink.registry)
        self.port = self._server.server_port
        RECORDER.add_sink(self.sink)
        return self.port

    def stop(self) -> None:
        """Detaches the sink and stops the HTTP server."""
        RECORDER.remove_sink(self.sink)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Counts every gRPC call by method and final status code and times it (a stream until its
    last message), into ``relay_grpc_requests_total`` / ``relay_grpc_request_seconds``."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.lstrip("/")
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                began, failure = time.monotonic(), None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    _record(method, context, failure, time.monotonic() - began)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_metered_stream(handler.unary_stream, method),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:  # the token check's refusal answers every call this way
            return grpc.stream_stream_rpc_method_handler(_metered_stream(handler.stream_stream, method),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler


def _metered_stream(behaviour, method: str):
    """A streaming handler's ``behaviour`` (``(request or request iterator, context)``: an async
    generator, or a coroutine writing with ``context.write`` as health's Watch does), recorded
    when it ends."""

    async def metered(request, context):
        began, failure, result = time.monotonic(), None, None
        try:
            result = behaviour(request, context)
            if hasattr(result, "__aiter__"):
                async for message in result:
                    yield message
            else:
                await result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # Closed while suspended at a yield (the client went away), an async for leaves the
            # inner generator suspended: close it, so that its own cleanup (the job's stream
            # count, its cancel) runs now.
            if hasattr(result, "aclose"):
                await result.aclose()
            _record(method, context, failure, time.monotonic() - began)

    return metered


def _record(method: str, context, failure, seconds: float) -> None:
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - an older grpcio without ServicerContext.code()
        code = None
    if code is None:
        code = grpc.StatusCode.OK if failure is None else (
            grpc.StatusCode.CANCELLED if type(failure).__name__ == "CancelledError" else grpc.StatusCode.UNKNOWN)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    RECORDER.inc("relay_grpc_requests_total", method=method, code=name)
    RECORDER.observe("relay_grpc_request_seconds", seconds, method=method)


class HttpMetrics:
    """ASGI middleware recording each HTTP request by route template (``/v1/videos/{video_id}``,
    never the id itself) and status into ``relay_http_requests_total`` and
    ``relay_http_request_seconds`` (until the response's last byte: a server-sent event stream
    counts when it ends). Pure ASGI, so streamed responses pass through untouched.

    Args:
        app: The ASGI app it wraps (``FastAPI.add_middleware(HttpMetrics)``).
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.monotonic(), [500]

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            RECORDER.inc("relay_http_requests_total", route=template, status=str(status[0]))
            RECORDER.observe("relay_http_request_seconds", time.monotonic() - began, route=template)
