"""A service runner over the stage scheduler: the gRPC service on worker groups.

:class:`ScheduledRunner` plugs a :class:`~engine.scheduler.StageScheduler` (worker groups built
by any executor: in this process, local processes, torchrun, Ray actors) into
:class:`engine.service.AsyncEngine`. Its ``capacity`` is the number of groups, so the service
keeps every group busy: with a staged pair, request i's low-noise steps run while request i+1's
high-noise steps do.
"""

from __future__ import annotations

import logging
import time

from relay.engine.request import GenerationRequest, ResolvedRequest, resolve_request
from relay.engine.scheduler import RequestCancelled
from relay.engine.service import CANCELLED, encode_output, png_with_size
from relay.engine.stages import request_experts

log = logging.getLogger(__name__)

#: How often a waiting runner thread looks at the job's cancel flag (seconds).
CANCEL_POLL_S = 0.1


class ScheduledRunner:
    """Runs jobs of one model through a stage scheduler.

    Args:
        scheduler: The scheduler over this model's worker groups.
        info: The model's :class:`~engine.model_info.ModelInfo`.
        name: The served model name.
        tokenizer: The model's tokenizer (prompt validation happens here, before any worker).
    """

    def __init__(self, scheduler, info, *, name: str, tokenizer) -> None:
        self.scheduler = scheduler
        self.info = info
        self.name = name
        self.tokenizer = tokenizer
        self.capacity = max(1, len(scheduler.groups))

    def unserved(self) -> str | None:
        """``None`` while every stage has a live worker group, else why not
        (:meth:`engine.scheduler.StageScheduler.unserved`)."""
        return self.scheduler.unserved()

    def resolve(self, request: GenerationRequest) -> ResolvedRequest:
        """Validation only (prompt length included); no worker is touched."""
        return resolve_request(request, self.info, tokenizer=self.tokenizer)

    def run(self, job, emit, should_stop) -> tuple[tuple[bytes, str, bytes], dict, dict]:
        """Submits the job, relays its events, and returns the encoded video, the timings and
        the run stats (:mod:`engine.stats`).

        Raises:
            engine.service.CANCELLED: the job was cancelled (at a step boundary).
            engine.scheduler.RequestFailed: the request failed (e.g. it kept breaking its group).
        """
        marks = {"submitted": time.monotonic()}

        def on_event(kind: str, data: dict) -> None:
            if kind == "progress":
                marks.setdefault("denoise", time.monotonic())
                emit("progress", step=data["step"], total=data["total"], expert=data["expert"],
                     elapsed_s=data["elapsed_s"], eta_s=data["eta_s"], timestep=data["timestep"],
                     group=data["group"], forwards=data.get("forwards", 0), skipped=data.get("skipped", 0))
            elif kind == "preview":
                png, width, height = png_with_size(data["png"])
                emit("preview", step=data["step"], png=png, width=width, height=height)
            elif kind == "decoding":
                marks["decoding"] = time.monotonic()
                emit("decoding")
            elif kind == "retry":
                log.warning("job %s: worker group %s failed (%s); resuming from its checkpoint",
                            job.job_id, data.get("group"), data.get("error"))

        ticket = self.scheduler.submit(job.request.to_dict(with_image=True),
                                       experts=request_experts(self.info, job.request),
                                       priority=job.priority, preview_every=job.preview_every,
                                       on_event=on_event, label=job.job_id)
        while not ticket._done.wait(CANCEL_POLL_S):
            if should_stop() and not ticket.cancelled:
                self.scheduler.cancel(ticket)  # takes effect at the next step boundary
        try:
            frames = ticket.clip()
        except RequestCancelled:
            raise CANCELLED from None
        output = encode_output(frames, job.output_format, fps=job.request.fps)
        now = time.monotonic()
        decoding = marks.get("decoding", now)
        timings = {"encode_s": marks.get("denoise", decoding) - marks["submitted"],
                   "denoise_s": decoding - marks.get("denoise", decoding), "decode_s": now - decoding,
                   "retries": ticket.attempts}
        return output, timings, ticket.stats.to_dict()
