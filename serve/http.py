"""The HTTP videos API, beside the gRPC server in the same process (``relay serve --http-port``).

An OpenAI-style ``/v1/videos`` resource over the same :class:`engine.service.AsyncEngine` as
gRPC -- the same admission, queue, validation and bearer tokens (TLS through the same
certificate) -- on FastAPI (pydantic schemas, OpenAPI at ``/openapi.json``, docs at ``/docs``)
served by uvicorn on the server's event loop:

* ``POST /v1/videos`` -- create a job: ``prompt``, ``model``, ``size`` (``"WxH"``), ``seconds``,
  ``input_reference`` (base64 image); Relay's own fields (``negative_prompt``, ``seed``,
  ``steps``, ``guidance``, ``guidance_low``, ``shift``, ``fps``, ``solver``, ``preset``,
  ``loras``, ``cache``, ``cache_high``, ``cache_low``). HTTP jobs are detached: they outlive the
  request and their video waits within the server's result budget.
* ``GET /v1/videos/{id}`` -- status (``queued``, ``in_progress``, ``completed``, ``failed``,
  ``cancelled``) and ``progress`` 0-100; ``GET /v1/videos/{id}/content`` -- the MP4;
  ``DELETE /v1/videos/{id}`` -- cancel; ``GET /v1/videos/{id}/events`` -- server-sent events:
  ``progress`` (step, expert, ETA, queue position) and ``preview`` (a PNG, base64) as they
  change, then ``done``, ``failed`` or ``cancelled``.

Errors are JSON ``{"error": {"code", "field", "message"}}``: 400 with the offending field, 401
without a valid token, 404 for an unknown id (or a result that is gone), 409 for content that is
not ready, 429 when the queue is full, 503 while starting or draining.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from relay.engine.errors import ValidationError
from relay.engine.service import AsyncEngine, Draining, JobState, QueueFull

STATUS = {JobState.QUEUED: "queued", JobState.RUNNING: "in_progress", JobState.DECODING: "in_progress",
          JobState.SUCCEEDED: "completed", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}


class LoraIn(BaseModel):
    """A LoRA of the server's ``--lora-dir``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    scale: float = 1.0
    expert: Literal["high_noise", "low_noise"] | None = None


class VideoCreate(BaseModel):
    """``POST /v1/videos``: OpenAI's fields, then Relay's own (unset = the model's default)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="what the video shows (at most 512 text-encoder tokens)")
    model: str = Field("", description="a served model's name (GET /v1/models); empty = the default")
    size: str | None = Field(None, description="WIDTHxHEIGHT in pixels, e.g. 1280x720")
    seconds: float | str | None = Field(None, description="duration; frames = seconds x fps + 1, which must be 4k+1")
    input_reference: str | None = Field(None, description="first frame for image-to-video: base64 PNG/JPEG/WebP")
    frames: int | None = Field(None, description="Relay's alternative to seconds: the frame count, 4k+1")
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_low: float | None = None
    shift: float | None = None
    fps: int | None = None
    solver: str | None = None
    preset: str | None = None
    loras: list[LoraIn] = Field(default_factory=list)
    cache: str | None = None
    cache_high: str | None = None
    cache_low: str | None = None
    guidance_terms: str | None = Field(None, description="LTX-2's guidance terms beyond guidance, "
                                                         "e.g. audio=7,stg=1,stg_blocks=28 (Wan: none)")
    output_format: Literal["mp4", "npy"] = Field("mp4", description="content: H.264 MP4, or the float32 "
                                                 "frames (F, H, W, 3) in [0, 1] as .npy (exact, for tools)")


class VideoOut(BaseModel):
    """A video job."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int = Field(description="0-100")
    created_at: int
    size: str
    seconds: str
    frames: int
    seed: int
    queue_position: int = Field(description="-1 when not queued")
    error: str | None = None
    has_content: bool
    content_expires_in_s: float


class HttpError(Exception):
    """An HTTP error answer: status, code, field and message."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def to_request(body: VideoCreate, info):
    """The engine request of a create body; ``size`` and ``seconds`` are checked here."""
    from relay.engine.lora import LoraRef
    from relay.engine.request import GenerationRequest

    width = height = None
    if body.size is not None:
        parts = body.size.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValidationError("size", f"must be WIDTHxHEIGHT like 1280x720, got {body.size!r}")
        width, height = int(parts[0]), int(parts[1])
    frames = body.frames
    if body.seconds is not None and body.frames is not None:
        raise ValidationError("seconds", "give seconds or frames, not both")
    if body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise ValidationError("seconds", f"must be a number, got {body.seconds!r}") from None
        fps = body.fps or info.defaults.fps
        exact = seconds * fps
        stride = info.temporal_stride
        if not seconds > 0 or abs(exact - round(exact)) > 1e-6 or round(exact) % stride:
            raise ValidationError("seconds", f"x {fps} fps must be a multiple of {stride} frames (frames = "
                                             f"seconds x fps + 1 = {stride}k+1), got {body.seconds}")
        frames = int(round(exact)) + 1
    image = None
    if body.input_reference is not None:
        try:
            image = base64.b64decode(body.input_reference, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("input_reference", "must be base64 image bytes") from None
    return GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width, frames=frames,
        steps=body.steps, seed=body.seed, guidance=body.guidance, guidance_low=body.guidance_low, shift=body.shift,
        fps=body.fps, image=image, solver=body.solver, preset=body.preset,
        loras=tuple(LoraRef(path=lora.name, scale=lora.scale, expert=lora.expert) for lora in body.loras),
        cache=body.cache, cache_high=body.cache_high, cache_low=body.cache_low, guidance_terms=body.guidance_terms)


def video_out(engine: AsyncEngine, job, created_at: float) -> VideoOut:
    """The API's view of a job."""
    r = job.request
    total = max(r.steps, 1)
    done = job.state == JobState.SUCCEEDED
    progress = 100 if done else int(100 * job.step / total) if job.state != JobState.QUEUED else 0
    return VideoOut(id=job.job_id, model=job.model, status=STATUS[job.state], progress=min(progress, 99 if not done else 100),
                    created_at=int(created_at), size=f"{r.width}x{r.height}", seconds=f"{(r.frames - 1) / r.fps:g}",
                    frames=r.frames, seed=r.seed, queue_position=engine.position(job), error=job.error or None,
                    has_content=done and bool(job.output), content_expires_in_s=engine.result_expires_in(job))


def build_app(engine: AsyncEngine, models: dict, *, tokens=()):
    """The FastAPI application of the videos API (and the web page at ``/``)."""
    from relay.serve.metrics import HttpMetrics

    app = FastAPI(title="Relay videos API", version="1", description=__doc__.split("\n\n")[1])
    app.add_middleware(HttpMetrics)
    created: dict[str, float] = {}
    auth = None
    if tokens:
        from relay.serve.auth import TokenAuthInterceptor

        auth = TokenAuthInterceptor(tokens)

    def check_token(request: Request) -> None:
        if auth is not None and not auth.authorized([("authorization", h) for h in
                                                     request.headers.getlist("authorization")]):
            raise HttpError(401, "unauthorized", "missing or invalid bearer token")

    @app.exception_handler(HttpError)
    async def _http_error(request, exc: HttpError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": {"code": exc.code, "field": exc.field, "message": exc.message}},
                            status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _schema_error(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
        field = ".".join(loc) or None
        return JSONResponse({"error": {"code": "invalid_request", "field": field,
                                       "message": f"{field}: {first.get('msg')}" if field else first.get("msg")}},
                            status_code=400)

    def job_or_404(video_id: str):
        engine.expire_results()
        job = engine.jobs.get(video_id)
        if job is None:
            raise HttpError(404, "not_found", f"no video {video_id!r}", "id")
        return job

    guarded = [Depends(check_token)]

    @app.get("/v1/models", dependencies=guarded)
    async def list_models() -> dict:
        """The served models with their defaults."""
        return {"object": "list", "data": [
            {"id": name, "object": "model", "kind": info.kind, "default": name == engine.default_model,
             "size": f"{info.defaults.width}x{info.defaults.height}", "frames": info.defaults.frames,
             "fps": info.defaults.fps, "steps": info.defaults.steps, "spatial_multiple": info.spatial_multiple,
             "family": info.family, "tasks": list(info.tasks), "has_audio": info.has_audio,
             "audio_sample_rate": info.audio_sample_rate}
            for name, info in models.items()]}

    @app.post("/v1/videos", dependencies=guarded, response_model=VideoOut)
    async def create_video(body: VideoCreate) -> VideoOut:
        """Queues a generation (detached: it outlives this request)."""
        name = body.model or engine.default_model
        try:
            if name not in models:
                raise ValidationError("model", f"unknown model {name!r}; served: {', '.join(sorted(models))}")
            job = engine.submit(to_request(body, models[name]), model=name, output_format=body.output_format,
                                detached=True, preview_every=1)
        except ValidationError as exc:
            raise HttpError(400, "invalid_request", f"{exc.field}: {exc.message}", exc.field) from None
        except QueueFull as exc:
            raise HttpError(429, "queue_full", str(exc)) from None
        except Draining as exc:
            raise HttpError(503, "unavailable", str(exc)) from None
        created[job.job_id] = time.time()
        return video_out(engine, job, created[job.job_id])

    @app.get("/v1/videos/{video_id}", dependencies=guarded, response_model=VideoOut)
    async def get_video(video_id: str) -> VideoOut:
        """A job's status and progress."""
        job = job_or_404(video_id)
        return video_out(engine, job, created.get(video_id, time.time()))

    @app.delete("/v1/videos/{video_id}", dependencies=guarded, response_model=VideoOut)
    async def delete_video(video_id: str) -> VideoOut:
        """Cancels a queued job now, a running one at its next step."""
        job = job_or_404(video_id)
        engine.cancel(video_id)
        return video_out(engine, job, created.get(video_id, time.time()))

    @app.get("/v1/videos/{video_id}/content", dependencies=guarded)
    async def get_content(video_id: str, variant: Literal["video", "audio"] = "video"):
        """The finished video (MP4, or ``.npy`` frames when created with ``output_format`` npy);
        ``variant=audio``: the sound of an npy job of a model with sound, as WAV (an MP4 holds
        its sound as an AAC track)."""
        job = job_or_404(video_id)
        if not job.state.ended:
            raise HttpError(409, "not_ready", f"video {video_id} is {STATUS[job.state]}", "id")
        if job.state != JobState.SUCCEEDED:
            raise HttpError(409, "no_content", f"video {video_id} {STATUS[job.state]}: {job.error}", "id")
        if not job.output:
            raise HttpError(404, "gone", f"the content of {video_id} is gone: {job.result_dropped}", "id")
        if variant == "audio":
            if not job.sound:
                why = "its model makes no sound" if job.output_format == "npy" else "an mp4 holds its sound as its AAC track"
                raise HttpError(404, "no_audio", f"video {video_id} has no separate audio: {why}", "variant")
            return Response(job.sound, media_type="audio/wav",
                            headers={"Content-Disposition": f'attachment; filename="{video_id}.wav"'})
        suffix = "npy" if job.output_format == "npy" else "mp4"
        return Response(job.output, media_type=job.mime,
                        headers={"Content-Disposition": f'attachment; filename="{video_id}.{suffix}"'})

    @app.get("/v1/videos/{video_id}/events", dependencies=guarded)
    async def events(video_id: str):
        """Server-sent events of a job until it ends."""
        job = job_or_404(video_id)
        return StreamingResponse(_sse(engine, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", include_in_schema=False)
    async def page():
        from importlib import resources

        html = resources.files("relay.serve").joinpath("web/index.html").read_text(encoding="utf-8")
        return Response(html, media_type="text/html")

    return app


def _frame(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse(engine: AsyncEngine, job):
    """``progress`` / ``preview`` when they change (the newest only: a slow reader is never
    behind by more than one), comments as keep-alives, then the terminal event."""
    seen_version, seen_preview = -1, None
    while True:
        if job.version != seen_version:
            seen_version = job.version
            progress = job.latest.get("progress")
            yield _frame("progress", {
                "status": STATUS[job.state], "step": job.step, "total": job.request.steps,
                "progress": 100 if job.state == JobState.SUCCEEDED else int(100 * job.step / max(job.request.steps, 1)),
                "expert": progress.data.get("expert") if progress else None,
                "eta_s": progress.data.get("eta_s") if progress else None,
                "queue_position": engine.position(job)})
            preview = job.latest.get("preview")
            if preview is not None and preview is not seen_preview:
                seen_preview = preview
                yield _frame("preview", {"step": preview.data["step"], "width": preview.data["width"],
                                         "height": preview.data["height"],
                                         "png": base64.b64encode(preview.data["png"]).decode()})
        if job.state.ended:
            kind = {JobState.SUCCEEDED: "done", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}[job.state]
            yield _frame(kind, {"id": job.job_id, "status": STATUS[job.state], "error": job.error or None})
            return
        tick = job.tick
        try:
            await asyncio.wait_for(tick.wait(), timeout=engine.heartbeat_s)
        except asyncio.TimeoutError:
            yield b": keep-alive\n\n"


class HttpServer:
    """uvicorn serving :func:`build_app` on the running event loop (no signal handlers of its
    own: ``relay serve``'s drain stops it)."""

    def __init__(self, engine: AsyncEngine, models: dict, *, host: str, port: int, tokens=(),
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # older uvicorn
                pass

            from contextlib import contextmanager

            @contextmanager
            def capture_signals(self):  # the gRPC server's drain owns SIGTERM
                yield

        config = uvicorn.Config(build_app(engine, models, tokens=tokens), host=host, port=port, log_level="warning",
                                lifespan="off", ssl_certfile=tls_cert, ssl_keyfile=tls_key, access_log=False)
        self.server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Starts listening; returns the bound port."""
        self._task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stops accepting and closes the connections."""
        self.server.should_exit = True
        if self._task is not None:
            await self._task
