"""A small Python client for ``relay.v1.Relay`` (used by ``relay submit``).

    client = RelayClient("127.0.0.1:50051", token="...")
    result = client.generate(pb.GenerateRequest(prompt="a red kite"), on_event=print)
    open("kite.mp4", "wb").write(result.data)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import grpc

from relay.serve.gen.relay.v1 import relay_pb2 as pb
from relay.serve.gen.relay.v1 import relay_pb2_grpc as pb_grpc

MAX_MESSAGE = 40 * 1024 * 1024


@dataclass
class GenerationResult:
    """A finished generation: the file bytes, the ``done`` event and every event received."""

    job_id: str
    data: bytes
    done: pb.Done
    settings: pb.ResolvedSettings
    events: list


class IntegrityError(RuntimeError):
    """The received video does not match the server's size or sha256."""


class RelayClient:
    """Blocking client.

    Args:
        target: ``host:port``.
        token: Bearer token, when the server requires one.
        ca_file: CA certificate (PEM) to verify a TLS server; enables TLS.
        cert_file, key_file: Client certificate and key for mutual TLS.
        server_name: TLS name override (when the target address differs from the certificate).
    """

    def __init__(self, target: str, *, token: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 server_name: str | None = None) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if ca_file:
            from relay.serve.auth import channel_credentials

            creds = channel_credentials(ca_file, cert_file, key_file)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.RelayStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, request: pb.GenerateRequest, *, on_event=None, timeout: float | None = None,
                 keep_events: bool = True) -> GenerationResult:
        """Runs one generation; ``on_event`` sees every event as it arrives.

        Raises:
            grpc.RpcError: the server refused or failed the job (status and message as sent).
            IntegrityError: the assembled file does not match ``done``.
        """
        stream = self.stub.Generate(request, timeout=timeout, metadata=self.metadata)
        return _assemble(stream, on_event=on_event, keep_events=keep_events)

    def submit_detached(self, request: pb.GenerateRequest, *, timeout: float | None = 60.0) -> tuple[str, pb.Accepted]:
        """Submits ``request`` detached and returns ``(job id, Accepted)`` once the server accepted
        it; the job runs on without this client (fetch it with :meth:`fetch`).

        Raises:
            grpc.RpcError: the server refused the job.
        """
        detached = pb.GenerateRequest()
        detached.CopyFrom(request)
        detached.detach = True
        stream = self.stub.Generate(detached, timeout=timeout, metadata=self.metadata)
        try:
            for event in stream:
                if event.WhichOneof("event") == "accepted":
                    accepted = pb.Accepted()
                    accepted.CopyFrom(event.accepted)
                    return event.job_id, accepted
        finally:
            stream.cancel()  # the job is detached: leaving its stream does not cancel it
        raise IntegrityError("stream ended before the job was accepted")

    def fetch(self, job_id: str, *, on_event=None, timeout: float | None = None) -> GenerationResult:
        """The finished video of a detached job (waits for it to end).

        Raises:
            grpc.RpcError: ``NOT_FOUND`` (no such job, or its result is gone), or the job's failure.
            IntegrityError: the assembled file does not match ``done``.
        """
        settings = self.get_job(job_id).settings  # before: the job may leave the server's list after
        stream = self.stub.GetResult(pb.GetJobRequest(job_id=job_id), timeout=timeout, metadata=self.metadata)
        result = _assemble(stream, on_event=on_event, keep_events=False)
        result.settings = settings
        return result

    def cancel(self, job_id: str) -> pb.CancelResponse:
        """Cancels a job."""
        return self.stub.Cancel(pb.CancelRequest(job_id=job_id), metadata=self.metadata)

    def get_job(self, job_id: str) -> pb.Job:
        """A job's state."""
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self.metadata)

    def list_models(self) -> pb.ListModelsResponse:
        """The served models."""
        return self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata)


def _assemble(stream, *, on_event=None, keep_events: bool = True) -> GenerationResult:
    """Reads a stream of ``GenerateEvent`` into the file it ends with, checking size and sha256."""
    chunks, events, job_id, settings, done = [], [], "", None, None
    expected_offset = 0
    for event in stream:
        job_id = event.job_id
        if keep_events:
            events.append(event)
        kind = event.WhichOneof("event")
        if kind == "accepted":
            settings = event.accepted.settings
        elif kind == "video_chunk":
            if event.video_chunk.offset != expected_offset:
                raise IntegrityError(f"chunk at offset {event.video_chunk.offset}, expected {expected_offset}")
            chunks.append(event.video_chunk.data)
            expected_offset += len(event.video_chunk.data)
        elif kind == "done":
            done = event.done
        if on_event is not None:
            on_event(event)
    data = b"".join(chunks)
    if done is None:
        raise IntegrityError("stream ended without a done event")
    if len(data) != done.size or hashlib.sha256(data).hexdigest() != done.sha256:
        raise IntegrityError("received video does not match the server's size/sha256")
    return GenerationResult(job_id=job_id, data=data, done=done, settings=settings, events=events)
