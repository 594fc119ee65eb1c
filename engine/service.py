"""The asynchronous engine behind the service: admission, a priority queue, one runner per
device group, per-job event streams, cancellation at step boundaries, and drain.

It speaks engine dataclasses only (no gRPC): the servicer converts messages and yields the
events of :meth:`AsyncEngine.events`. Progress and preview events are merged for a slow
consumer (the newest replaces an unread one), so a stalled client never makes memory grow.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from relay.engine.errors import ValidationError
from relay.engine.logs import REQUEST_ID, request_context
from relay.engine.metrics import RECORDER
from relay.engine.tickets import RequestOutOfMemory
from relay.engine.request import GenerationRequest, ResolvedRequest

log = logging.getLogger(__name__)


#: Unread events a stream may accumulate before progress/preview events are merged.
MERGE_BACKLOG = 64


class JobState(Enum):
    """Lifecycle of a job."""

    QUEUED = "queued"
    RUNNING = "running"
    DECODING = "decoding"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """True for the terminal states."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class QueueFull(RuntimeError):
    """Admission refused: the running slot and the queue are full."""


class Draining(RuntimeError):
    """Admission refused: the engine is draining for shutdown."""


@dataclass(frozen=True)
class Event:
    """One event of a job stream; ``kind`` is accepted, queued, started, progress, preview,
    decoding, done, failed or cancelled; ``data`` holds the kind's fields."""

    kind: str
    data: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Job:
    """A submitted generation and its live state (owned by the engine's event loop)."""

    job_id: str
    model: str
    request: ResolvedRequest
    output_format: str  # "mp4" or "npy"
    preview_every: int
    priority: int
    client_request_id: str
    state: JobState = JobState.QUEUED
    step: int = 0
    error: str = ""
    output: bytes = b""
    mime: str = ""
    #: The sound of an ``npy`` job of a model with an audio stream, as a WAV file (an mp4 holds
    #: its sound as an AAC track); ``b""`` otherwise.
    sound: bytes = b""
    timings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    submitted: float = field(default_factory=time.monotonic)
    cancel_requested: bool = False
    #: Submitted to outlive its stream: a disconnect does not cancel it.
    detached: bool = False
    #: gRPC streams delivering this job now (a kept result is not dropped under them).
    streams: int = 0
    #: When its result was kept (the engine's clock), and whether it has been dropped since.
    finished_at: float | None = None
    result_dropped: str = ""
    _events: deque = field(default_factory=deque)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ended: asyncio.Event = field(default_factory=asyncio.Event)
    #: For watchers that read the job without consuming its stream (the HTTP events): a count
    #: of emitted events, the newest event of each kind, and an event set (then replaced) on
    #: each emit.
    version: int = 0
    latest: dict = field(default_factory=dict)
    tick: asyncio.Event = field(default_factory=asyncio.Event)


class AsyncEngine:
    """Admits, queues and runs jobs; up to ``runner.capacity`` jobs at a time per runner.

    Args:
        runners: ``{model name: runner}``; a runner has ``resolve(GenerationRequest) ->
            ResolvedRequest`` (validation, no GPU work) and ``run(job, emit, should_stop) ->
            ((bytes, mime, sound), timings, stats)`` which executes on a worker thread, and optionally a
            ``capacity`` (jobs it runs at once, default 1: a stage scheduler overlapping
            requests over several worker groups takes more). :class:`engine.scheduled.ScheduledRunner`
            is the runner over a stage scheduler.
        default_model: Name used when a request names none.
        max_queue: Jobs that may wait behind the running ones before admission is refused.
        heartbeat_s: Interval of ``queued`` heartbeats while a job waits.
        keep_finished: How many ended jobs stay visible to :meth:`get`.
        lora_dir: The folder requests name LoRA files in (``None``: requests take no LoRAs).
        result_ttl_s: How long a finished job's video is kept for a later fetch.
        result_budget_bytes: The most bytes of finished videos kept at once; beyond it the
            oldest are dropped first (their jobs stay visible, without a result).
        clock: Monotonic seconds (tests pass their own to age results without waiting).
        log_prompts: Log each job's prompts in its admission line (off: prompts are never logged).
    """

    def __init__(self, runners: dict, *, default_model: str, max_queue: int = 8,
                 heartbeat_s: float = 5.0, keep_finished: int = 256, lora_dir=None,
                 result_ttl_s: float = 3600.0, result_budget_bytes: int = 2 << 30, clock=time.monotonic,
                 log_prompts: bool = False) -> None:
        self.runners = runners
        #: Whether a job's admission line carries its prompts (never by default).
        self.log_prompts = log_prompts
        self.result_ttl_s = result_ttl_s
        self.result_budget_bytes = result_budget_bytes
        self.clock = clock
        self._results: deque[Job] = deque()  # finished jobs holding a video, oldest first
        self.lora_dir = lora_dir
        self.default_model = default_model
        self.max_queue = max_queue
        self.heartbeat_s = heartbeat_s
        self.keep_finished = keep_finished
        self.jobs: dict[str, Job] = {}
        self._finished: deque[str] = deque()
        self._queue: list = []
        self._order = itertools.count()
        self._running: dict[str, Job] = {}  # by job id
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # set whenever no job is running
        self._idle.set()
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self.worker_calls = 0  # jobs handed to a runner (tests: invalid input never gets here)
        self.open_streams = 0
        self._step_seconds: float | None = None
        self.ready = False  # set once every runner's model is loaded

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the scheduling task on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._schedule(), name="relay-scheduler")
        self._sweeper = self._loop.create_task(self._sweep(), name="relay-result-sweeper")

    async def drain(self, grace_s: float) -> None:
        """Refuses new jobs, cancels queued ones, lets the running one finish within
        ``grace_s`` (then cancels it at its next step), and stops the scheduler."""
        self._draining = True
        for _, _, job in list(self._queue):
            self._finish(job, JobState.CANCELLED, error="server is shutting down")
        self._queue.clear()
        self._announce_positions()
        if self._running:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            except asyncio.TimeoutError:
                for job in self._running.values():
                    job.cancel_requested = True  # stops at its next step boundary
                await self._idle.wait()
        tasks = [task for task in (self._task, self._sweeper) if task is not None and task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        # The loop may close right after this: the cancellations are seen through, so no task
        # is left pending ("Task was destroyed but it is pending" at exit).
        await asyncio.gather(*tasks, return_exceptions=True)

    def unserved(self) -> dict[str, str]:
        """The models that cannot run every request now (a stage with no live worker group),
        each with why; empty while all can (runners without the check always can)."""
        out = {}
        for name, runner in list(self.runners.items()):
            check = getattr(runner, "unserved", None)
            why = check() if check is not None else None
            if why:
                out[name] = why
        return out

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` has begun."""
        return self._draining

    @property
    def active_jobs(self) -> int:
        """Jobs queued or running."""
        return len(self._queue) + len(self._running)

    @property
    def slots(self) -> int:
        """Jobs that may run at once: the sum of the runners' ``capacity`` (default 1 each)."""
        return sum(getattr(runner, "capacity", 1) for runner in self.runners.values()) or 1

    # --- admission ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, model: str = "", output_format: str = "mp4",
               preview_every: int = 0, priority: int = 0, client_request_id: str = "",
               detached: bool = False) -> Job:
        """Validates and admits a job (call on the event loop). A ``detached`` job keeps running
        when its stream goes away; its video is kept for a later fetch within the result TTL and budget.

        Raises:
            ValidationError: a field is invalid (nothing is queued, no runner is touched).
            QueueFull: the running slot and the queue are full.
            Draining: the engine is shutting down.

        A refusal is counted as a ``rejected`` request (``relay_requests_total``).
        """
        try:
            return self._admit(request, model=model, output_format=output_format, preview_every=preview_every,
                               priority=priority, client_request_id=client_request_id, detached=detached)
        except (ValidationError, QueueFull, Draining):
            RECORDER.inc("relay_requests_total", model=(model or self.default_model) if (model or self.default_model)
                         in self.runners else "unknown", outcome="rejected")
            raise

    def _admit(self, request: GenerationRequest, *, model: str, output_format: str, preview_every: int,
               priority: int, client_request_id: str, detached: bool) -> Job:
        """The admission itself (:meth:`submit`)."""
        if self._draining:
            raise Draining("server is draining; no new jobs")
        if not self.ready:
            raise Draining("server is starting; models are still loading")
        name = model or self.default_model
        if name not in self.runners:
            raise ValidationError("model", f"unknown model {name!r}; served: {', '.join(sorted(self.runners))}")
        if output_format not in ("mp4", "npy"):
            raise ValidationError("output_format", f"must be mp4 or npy, got {output_format!r}")
        if not 0 <= preview_every <= 1000:
            raise ValidationError("preview_every", f"must be between 0 and 1000, got {preview_every}")
        if len(client_request_id) > 256:
            raise ValidationError("client_request_id", "is longer than 256 characters")
        if request.loras:  # names inside the LoRA directory, before the model's rules read them
            from dataclasses import replace

            from relay.engine.lora import in_directory

            request = replace(request, loras=in_directory(request.loras, self.lora_dir))
        resolved = self.runners[name].resolve(request)
        limit = self.slots + self.max_queue
        if self.active_jobs >= limit:
            raise QueueFull(f"{self.active_jobs} jobs running or queued; the limit is {limit}")
        job = Job(job_id=uuid.uuid4().hex[:16], model=name, request=resolved, output_format=output_format,
                  preview_every=preview_every, priority=priority, client_request_id=client_request_id,
                  detached=detached)
        self.jobs[job.job_id] = job
        # One line per admission; the prompts only when the operator asked (--log-prompts).
        prompts = f", prompt {resolved.prompt!r}, negative {resolved.negative_prompt!r}" if self.log_prompts else ""
        with request_context(job.job_id):
            log.info("job %s admitted: model %s%s%s", job.job_id, name, " (detached)" if detached else "", prompts)
        heapq.heappush(self._queue, (-priority, next(self._order), job))
        self._emit(job, Event("accepted"))
        self._announce_positions()
        self._wakeup.set()
        return job

    def cancel(self, job_id: str) -> tuple[bool, JobState]:
        """Cancels a queued job now or a running one at its next step boundary."""
        job = self.jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state.ended:
            return False, job.state
        if job.state == JobState.QUEUED:
            self._queue = [entry for entry in self._queue if entry[2] is not job]
            heapq.heapify(self._queue)
            self._finish(job, JobState.CANCELLED, error="cancelled")
            self._announce_positions()
            return True, job.state
        job.cancel_requested = True
        return True, job.state

    def position(self, job: Job) -> int:
        """0-based position of a queued job (-1 when not queued)."""
        ordered = [entry[2] for entry in sorted(self._queue)]
        return ordered.index(job) if job in ordered else -1

    def estimated_wait(self, job: Job) -> float:
        """Seconds until ``job`` starts, from recent step times (0 when unknown)."""
        if self._step_seconds is None:
            return 0.0
        ahead = [entry[2] for entry in sorted(self._queue)][: max(self.position(job), 0)]
        remaining = sum(j.request.steps for j in ahead)
        remaining += sum(job.request.steps - job.step for job in self._running.values())
        remaining /= self.slots
        return remaining * self._step_seconds

    # --- results ------------------------------------------------------------------------------
    def expire_results(self) -> None:
        """Drops the videos older than ``result_ttl_s``, then the oldest while the kept bytes
        exceed ``result_budget_bytes`` (the jobs stay visible, marked as dropped)."""
        now = self.clock()
        for job in [j for j in self._results if now - j.finished_at > self.result_ttl_s and not j.streams]:
            self._results.remove(job)
            self._drop(job, f"expired after {self.result_ttl_s:g} s")
        for job in [j for j in self._results if not j.streams]:  # oldest first; never under a stream
            if self.kept_bytes <= self.result_budget_bytes:
                break
            self._results.remove(job)
            self._drop(job, f"dropped: over the {self.result_budget_bytes} byte result budget")

    @property
    def kept_bytes(self) -> int:
        """Bytes of finished videos held for fetching."""
        return sum(len(job.output) + len(job.sound) for job in self._results)

    def result_expires_in(self, job: Job) -> float:
        """Seconds until ``job``'s video is dropped by age (0 when it has none)."""
        if not job.output or job.finished_at is None:
            return 0.0
        return max(0.0, self.result_ttl_s - (self.clock() - job.finished_at))

    async def wait_ended(self, job: Job) -> None:
        """Returns once ``job`` has ended (its events are not consumed)."""
        await job._ended.wait()

    def release(self, job: Job) -> None:
        """Frees the video of a job whose stream has delivered it (a job not detached)."""
        if not job.detached and job.output:
            self._drop(job, "delivered on its stream (submit detached to fetch it later)", quiet=True)

    def _drop(self, job: Job, why: str, *, quiet: bool = False) -> None:
        job.output, job.sound, job.result_dropped = b"", b"", why
        # A streamed job's video freed after delivery is routine: the one line per request stays one.
        (log.debug if quiet else log.info)("job %s result %s", job.job_id, why)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.result_ttl_s / 4)))
            self.expire_results()

    # --- event streams -----------------------------------------------------------------------
    async def events(self, job: Job):
        """Yields the job's events until it ends (the terminal event is the last one)."""
        self.open_streams += 1
        try:
            while True:
                while job._events:
                    event = job._events.popleft()
                    yield event
                    if event.kind in ("done", "failed", "cancelled"):
                        return
                job._changed.clear()
                try:
                    await asyncio.wait_for(job._changed.wait(), timeout=self.heartbeat_s)
                except asyncio.TimeoutError:
                    if job.state == JobState.QUEUED:
                        yield self._queued_event(job)
        finally:
            self.open_streams -= 1

    def _queued_event(self, job: Job) -> Event:
        return Event("queued", {"position": self.position(job), "estimated_wait_s": self.estimated_wait(job)})

    def _emit(self, job: Job, event: Event) -> None:
        """Appends an event. When a consumer falls behind (more than ``MERGE_BACKLOG`` unread
        events), an unread progress/preview/queued event is replaced by the newer one, so a
        stalled client costs bounded memory while a client that keeps up sees every step."""
        events = job._events
        if event.kind in ("progress", "preview", "queued") and (
                len(events) > MERGE_BACKLOG or event.kind == "queued"):
            for index in range(len(events) - 1, -1, -1):
                if events[index].kind == event.kind:
                    del events[index]
                    break
        events.append(event)
        job._changed.set()
        job.latest[event.kind] = event
        job.version += 1
        tick, job.tick = job.tick, asyncio.Event()
        tick.set()

    def _emit_threadsafe(self, job: Job, event: Event) -> None:
        self._loop.call_soon_threadsafe(self._emit, job, event)

    def _announce_positions(self) -> None:
        """Tells each queued job its place (and the metrics the queue's depth)."""
        for _, _, job in self._queue:
            self._emit(job, self._queued_event(job))
        if RECORDER.active:
            for name in self.runners:
                RECORDER.set("relay_queue_depth", sum(1 for _, _, job in self._queue if job.model == name), model=name)

    def _finish(self, job: Job, state: JobState, *, error: str = "", reason: str = "") -> None:
        started = job.state != JobState.QUEUED
        job.state = state
        job.error = error
        # One line per request at its end (never the prompt or a token).
        with request_context(job.job_id):
            log.info("job %s %s after %.2fs (%s)%s", job.job_id, state.value, time.monotonic() - job.submitted,
                     "ran" if started else "never ran", f": {error}" if error else "")
        kind = {JobState.SUCCEEDED: "done", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled"}[state]
        RECORDER.inc("relay_requests_total", model=job.model, outcome=state.value)
        if state == JobState.SUCCEEDED:
            RECORDER.observe("relay_request_seconds", time.monotonic() - job.submitted, model=job.model)
        if state == JobState.SUCCEEDED and job.output and job.detached:
            job.finished_at = self.clock()
            self._results.append(job)
        elif job.output and not job.streams:  # not detached and its stream is gone: nobody can fetch it
            self._drop(job, "not delivered: its stream had ended (submit detached to fetch it later)")
        self._emit(job, Event(kind, {"error": error, "reason": reason}))
        if not job.streams:  # nobody reads this job's stream: keep only the watchers' latest events
            job._events.clear()
        job._ended.set()
        self._finished.append(job.job_id)
        while len(self._finished) > self.keep_finished:
            gone = self.jobs.pop(self._finished.popleft(), None)
            if gone is not None and gone in self._results:
                self._results.remove(gone)
        self.expire_results()

    # --- execution ---------------------------------------------------------------------------
    def _free(self, model: str) -> bool:
        busy = sum(1 for job in self._running.values() if job.model == model)
        return busy < getattr(self.runners[model], "capacity", 1)

    async def _schedule(self) -> None:
        tasks: set[asyncio.Task] = set()
        while True:
            ready = [entry for entry in sorted(self._queue) if self._free(entry[2].model)]
            if not ready:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = ready[0][2]
            self._queue.remove(ready[0])
            heapq.heapify(self._queue)
            self._running[job.job_id] = job
            self._idle.clear()
            self._announce_positions()
            task = asyncio.get_running_loop().create_task(self._run_and_release(job))
            tasks.add(task)  # keep a reference until it finishes
            task.add_done_callback(tasks.discard)

    async def _run_and_release(self, job: Job) -> None:
        try:
            await self._run(job)
        finally:
            self._running.pop(job.job_id, None)
            if not self._running:
                self._idle.set()
            self._wakeup.set()

    async def _run(self, job: Job) -> None:
        REQUEST_ID.set(job.job_id)  # this job's task (and the worker thread it runs on): its lines carry its id
        r = job.request
        log.info("job %s started: model %s, %dx%d, %d frames, %d steps, seed %d, %s%s, queued %.2fs",
                 job.job_id, job.model, r.width, r.height, r.frames, r.steps, r.seed, job.output_format,
                 ", with image" if r.image is not None else "", time.monotonic() - job.submitted)
        job.state = JobState.RUNNING
        job.timings["queued_s"] = time.monotonic() - job.submitted
        self._emit(job, Event("started"))
        self.worker_calls += 1
        runner = self.runners[job.model]

        def emit(kind: str, **data) -> None:
            if kind == "progress":
                job.step = data["step"]
            if kind == "decoding":
                job.state = JobState.DECODING
            self._emit_threadsafe(job, Event(kind, data))

        try:
            output, timings, stats = await asyncio.to_thread(
                runner.run, job, emit, lambda: job.cancel_requested)
        except _Cancelled:
            self._finish(job, JobState.CANCELLED, error="cancelled")
            return
        except RequestOutOfMemory as exc:  # the user's to act on: what ran out, and what fits
            self._finish(job, JobState.FAILED, error=str(exc), reason="out_of_memory")
            return
        except Exception:  # noqa: BLE001 - reported to the client as an id, logged in full here
            error_id = uuid.uuid4().hex[:8]
            log.exception("job %s failed (error id %s)", job.job_id, error_id)
            self._finish(job, JobState.FAILED, error=f"internal error (id {error_id})")
            return
        (job.output, job.mime, job.sound), job.stats = output, stats
        job.timings.update(timings)
        job.timings["total_s"] = time.monotonic() - job.submitted
        steps = max(job.request.steps, 1)
        per_step = timings.get("denoise_s", 0.0) / steps
        self._step_seconds = per_step if self._step_seconds is None else 0.7 * self._step_seconds + 0.3 * per_step
        self._finish(job, JobState.SUCCEEDED)


class _Cancelled(Exception):
    """Raised inside a runner when a job is cancelled at a step boundary."""


CANCELLED = _Cancelled


def png_with_size(png: bytes) -> tuple[bytes, int, int]:
    """``(png, width, height)`` read from the PNG header."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return png, image.width, image.height


def encode_output(media, output_format: str, *, fps: int) -> tuple[bytes, str, bytes]:
    """A decoded video (frames ``(F, H, W, 3)`` in [0, 1] or a :class:`engine.video.Clip`) as
    the job's output: ``(bytes, MIME type, sound)``. ``mp4``: H.264 with the clip's AAC track;
    ``npy``: the float frames, with the sound as a 16-bit WAV file beside them (``b""`` for a
    silent model or an mp4, whose track holds it)."""
    from relay.engine.video import as_clip, encode_wav

    clip = as_clip(media)
    if output_format == "npy":
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.save(buffer, clip.frames.astype(np.float32))
        sound = encode_wav(clip.audio, clip.sample_rate) if clip.audio is not None else b""
        return buffer.getvalue(), "application/x-npy", sound
    from relay.engine.video import encode_mp4

    data = encode_mp4(clip.frames, fps=fps, audio=clip.audio, sample_rate=clip.sample_rate)
    return data, "video/mp4", b""
