"""The gRPC server: ``relay.v1.Relay`` on ``grpc.aio``, health, optional reflection, auth, TLS,
keepalive, and a graceful drain on SIGTERM.

The servicer only converts messages (:mod:`serve.convert`) and relays the events of
:class:`engine.service.AsyncEngine`; it never touches a model.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from dataclasses import dataclass, field

import grpc

from relay.engine.errors import ValidationError
from relay.engine.service import AsyncEngine, Draining, QueueFull
from relay.serve import convert
from relay.serve.gen.relay.v1 import relay_pb2 as pb
from relay.serve.gen.relay.v1 import relay_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = "relay.v1.Relay"
#: How often the server compares its health with what the engine can serve (seconds).
CAPACITY_POLL_S = 1.0
MAX_MESSAGE = 40 * 1024 * 1024  # a 32 MiB image plus the rest of the request

#: Long idle streams (a job waiting in the queue) stay alive through proxies: ping every 30 s,
#: and accept client pings as often as every 10 s even without an active call.
KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
]


class RelayServicer(pb_grpc.RelayServicer):
    """Thin servicer: proto <-> engine, statuses for refusals."""

    def __init__(self, engine: AsyncEngine, models: dict) -> None:
        self.engine = engine
        self.models = models  # name -> ModelInfo

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        try:
            job = self.engine.submit(
                convert.to_request(request), model=request.model, output_format=convert.output_format(request),
                preview_every=request.preview_every, priority=request.priority,
                client_request_id=request.client_request_id, detached=request.detach)
        except ValidationError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}")
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Draining as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        # Client gone or deadline passed: stop the job at its next step boundary. grpc cancels
        # the handler's task, which may land while this generator is parked at a ``yield``
        # (grpc sending), so no except clause here would see it: the done callback and the
        # ``finally`` (run when the generator is closed) both cancel a job that has not ended.
        # A detached job outlives its stream: nothing is cancelled when the client goes.
        context.add_done_callback(lambda _: self._abandon(job))
        job.streams += 1
        try:
            async for event in self.engine.events(job):
                if event.kind == "done":
                    if not job.output:
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"result {job.result_dropped}")
                    for message in convert.video_events(job):
                        yield message
                    return
                if event.kind == "failed":
                    code = (grpc.StatusCode.RESOURCE_EXHAUSTED if event.data.get("reason") == "out_of_memory"
                            else grpc.StatusCode.INTERNAL)
                    await context.abort(code, event.data["error"])
                if event.kind == "cancelled":
                    await context.abort(grpc.StatusCode.CANCELLED, event.data["error"] or "cancelled")
                message = convert.event_message(job, event)
                if message is not None:
                    yield message
        finally:
            job.streams -= 1
            self._abandon(job)
            if job.state.ended:
                self.engine.release(job)  # a streamed (not detached) job's video: delivered or abandoned

    def _abandon(self, job) -> None:
        """Cancels ``job`` unless it has ended or was submitted detached (its stream is gone)."""
        if not job.state.ended and not job.detached:
            self.engine.cancel(job.job_id)

    async def Cancel(self, request, context):  # noqa: N802
        try:
            cancelled, state = self.engine.cancel(request.job_id)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        return pb.CancelResponse(cancelled=cancelled, state=convert.STATES[state])

    async def GetJob(self, request, context):  # noqa: N802
        self.engine.expire_results()  # what GetJob says of a result is true now, not at the next sweep
        job = self.engine.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        return convert.job_message(self.engine, job)

    async def GetResult(self, request, context):  # noqa: N802
        job = self.engine.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        await self.engine.wait_ended(job)  # the client's deadline bounds the wait
        if job.state.name == "FAILED":
            await context.abort(grpc.StatusCode.INTERNAL, job.error)
        if job.state.name == "CANCELLED":
            await context.abort(grpc.StatusCode.CANCELLED, job.error or "cancelled")
        self.engine.expire_results()
        if not job.output:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: the result of {job.job_id} is gone: "
                                                          f"{job.result_dropped or 'never kept'}")
        job.streams += 1
        streaming = True
        try:
            for message in convert.video_events(job):
                if message.WhichOneof("event") == "done":
                    # Every chunk is out: from here the result is the TTL's and the budget's again (a
                    # client that acts on ``done`` must not find it still held by this stream).
                    job.streams -= 1
                    streaming = False
                yield message
        finally:
            if streaming:
                job.streams -= 1

    async def ListModels(self, request, context):  # noqa: N802
        models = [pb.Model(name=name, kind=info.kind, is_default=name == self.engine.default_model,
                           moe=info.is_moe, spatial_multiple=info.spatial_multiple,
                           temporal_stride=info.temporal_stride, defaults=convert.model_defaults(name, info),
                           family=info.family, tasks=list(info.tasks), has_audio=info.has_audio,
                           audio_sample_rate=info.audio_sample_rate or 0)
                  for name, info in self.models.items()]
        from relay.engine.lora import list_loras

        loras = [pb.LoraFile(name=name, size=size) for name, size in list_loras(self.engine.lora_dir)]
        return pb.ListModelsResponse(models=models, loras=loras)


class _InternalErrors(grpc.aio.ServerInterceptor):
    """Turns an unexpected exception into INTERNAL with an error id (details go to the log)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler  # health and reflection have their own error handling
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                try:
                    return await inner(request, context)
                except Exception as exc:  # noqa: BLE001
                    await _internal(context, exc, details.method)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer)
        inner_stream = handler.unary_stream

        async def stream(request, context):
            messages = inner_stream(request, context)
            try:
                async for message in messages:
                    yield message
            except Exception as exc:  # noqa: BLE001
                await _internal(context, exc, details.method)
            finally:  # closed at a yield (the client went away): the handler's own cleanup runs now
                await messages.aclose()

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer)


async def _internal(context, exc: Exception, method: str) -> None:
    # An abort raised by the handler itself is already a status: let it through.
    if isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError":
        raise exc
    error_id = uuid.uuid4().hex[:8]
    log.exception("%s failed (error id %s)", method, error_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")


@dataclass(kw_only=True)
class ServerConfig:
    """Network and policy settings of ``relay serve``.

    Attributes:
        host, port: Listen address (port 0 picks a free port).
        tokens: Accepted bearer tokens; empty = no authentication.
        tls_cert, tls_key: Server certificate and key (PEM) for TLS.
        tls_client_ca: CA that client certificates must chain to (mutual TLS).
        reflection: Serve gRPC reflection.
        grace_s: How long in-flight jobs may run on after SIGTERM.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    tokens: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    reflection: bool = False
    grace_s: float = 60.0


class RelayServer:
    """A running server: call :meth:`start`, then :meth:`wait` (or :meth:`drain`)."""

    def __init__(self, engine: AsyncEngine, models: dict, config: ServerConfig) -> None:
        from grpc_health.v1 import health_pb2_grpc
        from grpc_health.v1._async import HealthServicer

        self.engine = engine
        self.config = config
        from relay.serve.metrics import GrpcMetrics

        interceptors = [_InternalErrors()]
        if config.tokens:
            from relay.serve.auth import TokenAuthInterceptor

            interceptors.insert(0, TokenAuthInterceptor(config.tokens))
        interceptors.insert(0, GrpcMetrics())  # first: it sees refused calls too
        self.server = grpc.aio.server(interceptors=interceptors, options=KEEPALIVE)
        pb_grpc.add_RelayServicer_to_server(RelayServicer(engine, models), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.reflection:
            from grpc_reflection.v1alpha import reflection

            from grpc_health.v1 import health_pb2

            names = (pb.DESCRIPTOR.services_by_name["Relay"].full_name,
                     health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            from relay.serve.auth import server_credentials

            creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        self._stopped = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        """Health status of the server and of the Relay service."""
        from grpc_health.v1 import health_pb2

        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def start(self) -> None:
        """Starts listening; health stays NOT_SERVING until :meth:`set_serving`."""
        await self.set_serving(False)
        await self.server.start()

    async def drain(self) -> None:
        """No new work (UNAVAILABLE), health NOT_SERVING, in-flight jobs finish within the grace
        period, then the server stops."""
        if self.engine.draining:
            return
        log.info("draining: no new jobs; in-flight jobs have %.0fs", self.config.grace_s)
        await self.set_serving(False)
        await self.engine.drain(self.config.grace_s)
        await self.server.stop(grace=5.0)
        self._stopped.set()

    async def watch_capacity(self, period_s: float = CAPACITY_POLL_S) -> None:
        """Keeps health in step with what the engine can serve, from the moment it is SERVING
        until the server drains: NOT_SERVING while a model has a stage that no live worker group
        runs (its group retired -- it may be trying to build again, see ``--rebuild-retry``), so
        that a load balancer or a readiness probe sends work elsewhere; SERVING once every stage
        has a group again. Requests that come anyway fail at once, saying why."""
        serving = True
        while not self.engine.draining and not self.stopped:
            unserved = self.engine.unserved()
            if (not unserved) != serving and not self.engine.draining:
                serving = not unserved
                await self.set_serving(serving)
                if serving:
                    log.warning("health SERVING again: every model's stages have a live worker group")
                else:
                    log.error("health NOT_SERVING: %s", "; ".join(f"{m}: {why}" for m, why in unserved.items()))
            await asyncio.sleep(period_s)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a drain."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    @property
    def stopped(self) -> bool:
        """True once :meth:`drain` has stopped the server."""
        return self._stopped.is_set()

    async def wait(self) -> None:
        """Until the server has drained and stopped."""
        await self._stopped.wait()
