"""Conversions between ``relay.v1`` messages and engine dataclasses (no logic beyond that)."""

from __future__ import annotations

from relay.engine.lora import LoraRef
from relay.engine.request import GenerationRequest, ResolvedRequest
from relay.engine.service import Event, Job, JobState
from relay.serve.gen.relay.v1 import relay_pb2 as pb

FORMATS = {pb.OUTPUT_FORMAT_UNSPECIFIED: "mp4", pb.OUTPUT_FORMAT_MP4: "mp4", pb.OUTPUT_FORMAT_NPY: "npy"}
FORMAT_ENUM = {"mp4": pb.OUTPUT_FORMAT_MP4, "npy": pb.OUTPUT_FORMAT_NPY}
STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED, JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.DECODING: pb.JOB_STATE_DECODING, JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED, JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
CHUNK_BYTES = 1 << 20


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def to_request(message: pb.GenerateRequest) -> GenerationRequest:
    """Proto request -> engine request (validation happens in the engine)."""
    seed = _optional(message, "seed")
    return GenerationRequest(
        prompt=message.prompt, negative_prompt=message.negative_prompt,
        height=_optional(message, "height"), width=_optional(message, "width"),
        frames=_optional(message, "frames"), steps=_optional(message, "steps"),
        seed=seed, guidance=_optional(message, "guidance"),
        guidance_low=_optional(message, "guidance_low"), shift=_optional(message, "shift"),
        boundary=_optional(message, "boundary"), fps=_optional(message, "fps"),
        image=message.image or None, solver=message.solver or None,
        timesteps=tuple(message.timesteps) or None, preset=message.preset or None,
        loras=tuple(LoraRef(path=lora.name, scale=lora.scale if lora.HasField("scale") else 1.0,
                            expert=lora.expert or None) for lora in message.loras),
        cache=message.cache or None, cache_high=message.cache_high or None, cache_low=message.cache_low or None,
        guidance_terms=message.guidance_terms or None,
    )


def output_format(message: pb.GenerateRequest) -> str:
    """The requested output format name; unknown enum values are passed on to be refused."""
    return FORMATS.get(message.output_format, f"unknown ({message.output_format})")


def settings(model: str, request: ResolvedRequest, fmt: str) -> pb.ResolvedSettings:
    """Engine resolved request -> proto settings."""
    out = pb.ResolvedSettings(
        model=model, prompt=request.prompt, negative_prompt=request.negative_prompt,
        height=request.height, width=request.width, frames=request.frames, steps=request.steps,
        seed=request.seed, guidance=request.guidance, shift=request.shift, fps=request.fps,
        has_image=request.image is not None, output_format=FORMAT_ENUM.get(fmt, 0),
        solver=request.solver, timesteps=list(request.timesteps or ()),
        loras=[pb.Lora(name=lora.name, scale=lora.scale, expert=expert)
               for lora in request.loras for expert in lora.experts],
        caches=dict(request.caches),
    )
    if request.guidance_terms:
        from relay.engine.request import guidance_terms_text

        out.guidance_terms = guidance_terms_text(request.guidance_terms)
    if request.guidance_low is not None:
        out.guidance_low = request.guidance_low
    if request.boundary is not None:
        out.boundary = request.boundary
    return out


def model_defaults(model: str, info) -> pb.ResolvedSettings:
    """A model's defaults as settings: no prompt, seed -1 (random), the size of the reference
    table (an I2V request takes its aspect from the image)."""
    d = info.defaults
    from relay.engine.solvers import solver_of

    out = pb.ResolvedSettings(model=model, height=d.height, width=d.width, frames=d.frames, steps=d.steps,
                              seed=-1, guidance=d.guidance, shift=d.shift, fps=d.fps,
                              output_format=pb.OUTPUT_FORMAT_MP4,
                              solver=solver_of(info.scheduler_class) or info.scheduler_class)
    if d.guidance_low is not None:
        out.guidance_low = d.guidance_low
    if d.boundary is not None:
        out.boundary = d.boundary
    reference = info.spec.resolve(GenerationRequest(prompt="defaults", seed=0), info)
    if reference.guidance_terms:  # the family's own terms at their defaults (LTX-2)
        from relay.engine.request import guidance_terms_text

        out.guidance_terms = guidance_terms_text(reference.guidance_terms)
    return out


def event_message(job: Job, event: Event) -> pb.GenerateEvent | None:
    """Engine event -> proto event; terminal events are handled by the servicer."""
    d = event.data
    if event.kind == "accepted":
        return pb.GenerateEvent(job_id=job.job_id, accepted=pb.Accepted(
            settings=settings(job.model, job.request, job.output_format),
            client_request_id=job.client_request_id))
    if event.kind == "queued":
        return pb.GenerateEvent(job_id=job.job_id, queued=pb.Queued(
            position=d["position"], estimated_wait_s=d["estimated_wait_s"]))
    if event.kind == "started":
        return pb.GenerateEvent(job_id=job.job_id, started=pb.Started())
    if event.kind == "progress":
        return pb.GenerateEvent(job_id=job.job_id, progress=pb.Progress(
            step=d["step"], total=d["total"], expert=d["expert"], stage="denoise",
            elapsed_s=d["elapsed_s"], eta_s=d["eta_s"], timestep=d["timestep"], group=d.get("group", "local"),
            forwards=d.get("forwards", 0), skipped=d.get("skipped", 0)))
    if event.kind == "preview":
        return pb.GenerateEvent(job_id=job.job_id, preview=pb.Preview(
            step=d["step"], png=d["png"], width=d["width"], height=d["height"]))
    if event.kind == "decoding":
        return pb.GenerateEvent(job_id=job.job_id, decoding=pb.Decoding())
    return None


def video_events(job: Job):
    """The finished output as ``video_chunk`` events of at most 1 MiB, then ``done``."""
    import hashlib

    data = job.output
    for offset in range(0, len(data), CHUNK_BYTES):
        yield pb.GenerateEvent(job_id=job.job_id, video_chunk=pb.VideoChunk(
            offset=offset, data=data[offset:offset + CHUNK_BYTES]))
    t = job.timings
    done = pb.Done(sha256=hashlib.sha256(data).hexdigest(), size=len(data), mime=job.mime,
                   timings=pb.Timings(queued_s=t.get("queued_s", 0.0), encode_s=t.get("encode_s", 0.0),
                                      denoise_s=t.get("denoise_s", 0.0), decode_s=t.get("decode_s", 0.0),
                                      total_s=t.get("total_s", 0.0)))
    done.stats.update(_plain(job.stats))
    if job.sound:  # an npy job's sound (an mp4 holds it as its AAC track)
        import io
        import wave

        with wave.open(io.BytesIO(job.sound)) as sound:
            done.audio_sample_rate = sound.getframerate()
        done.audio_wav = job.sound
    yield pb.GenerateEvent(job_id=job.job_id, done=done)


def _plain(value):
    """``value`` with only JSON types (a Struct holds no tuples, paths or numpy numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)  # a Struct number is a double: a 63-bit seed would lose its last digits
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def job_message(engine, job: Job) -> pb.Job:
    """Engine job -> proto job."""
    return pb.Job(job_id=job.job_id, state=STATES[job.state], step=job.step, total=job.request.steps,
                  queue_position=engine.position(job), error=job.error,
                  settings=settings(job.model, job.request, job.output_format), detached=job.detached,
                  has_result=bool(job.output) and job.state == JobState.SUCCEEDED,
                  result_expires_in_s=engine.result_expires_in(job), result_note=job.result_dropped)
