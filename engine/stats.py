"""Run statistics: one recorder per request, filled by the stage scheduler as the request runs,
read by every consumer (``relay generate --stats``, the service's ``done`` event).

The document (:meth:`RunStats.to_dict`, version :data:`STATS_VERSION`) has stable keys,
documented in the README:

* ``settings`` / ``sources``: the resolved settings and where each came from;
* ``seconds``: ``queued``, ``encode``, one key per expert segment (``high_noise``,
  ``low_noise`` or ``dense``), ``handoff`` (shipping a state to another group), ``decode``,
  ``total``;
* ``experts.<name>``: ``steps``, ``forwards`` (transformer forwards run) and ``skipped``
  (forwards a feature cache answered); ``forwards + skipped = steps x CFG branches``;
  ``lockstep``: skipped forwards whose blocks still ran because another rank's branch computed;
* ``caches.<name>``: what an expert's cache reported (``mag_ratios`` of a ``mag:calibrate`` run);
* ``decode``: ``group``, ``ranks`` (ranks that took part in the VAE decode: more than one with
  ``--vae-parallel``), ``seconds`` (the slowest rank's decode) and ``memory`` (per rank
  ``rank``, ``peak_bytes`` above what was in use before the decode, ``measure``);
* ``memory.<group>``: per rank ``rank``, ``device``, ``peak_bytes`` and ``measure``
  (``cuda_max_allocated`` on a GPU, ``host_peak_rss`` on a CPU) since the group's previous request;
* ``layout``: ``executor`` and the ``groups`` (name, roles, ranks, layout, backend, attention
  kernel);
* ``retries``: group failures the request survived.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

STATS_VERSION = 1


@dataclass
class RunStats:
    """What one request did, recorded once (see the module docstring for the keys)."""

    settings: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    caches: dict = field(default_factory=dict)
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def for_request(cls, request: dict, *, experts=(), layout: dict | None = None) -> RunStats:
        """A recorder for ``request`` (``ResolvedRequest.to_dict``; the image is not kept) whose
        steps run on ``experts``: every key is present from the start, at zero."""
        settings = {k: v for k, v in request.items() if k not in ("image", "sources")}
        settings["has_image"] = request.get("image") is not None
        names = list(dict.fromkeys(experts))
        seconds = dict.fromkeys(("queued", "encode", *names, "handoff", "decode", "total"), 0.0)
        counts = {name: {"steps": 0, "forwards": 0, "skipped": 0, "lockstep": 0} for name in names}
        return cls(settings=settings, sources=dict(request.get("sources") or {}), layout=dict(layout or {}),
                   seconds=seconds, experts=counts, decode={"group": None, "ranks": 0, "seconds": 0.0, "memory": []})

    def add_seconds(self, key: str, seconds: float) -> None:
        """Adds ``seconds`` to ``seconds[key]``."""
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + float(seconds)

    def add_step(self, expert: str, *, forwards: int, skipped: int, lockstep: int = 0,
                 cache: dict | None = None) -> None:
        """Counts one denoise step of ``expert`` (``cache``: its cache's report, if any)."""
        with self._lock:
            entry = self.experts.setdefault(expert, {"steps": 0, "forwards": 0, "skipped": 0, "lockstep": 0})
            entry["steps"] += 1
            entry["forwards"] += int(forwards)
            entry["skipped"] += int(skipped)
            entry["lockstep"] += int(lockstep)
            if cache:
                self.caches[expert] = dict(cache)

    def set_memory(self, group: str, ranks: list[dict]) -> None:
        """Records ``group``'s per-rank peak memory."""
        with self._lock:
            self.memory[group] = list(ranks)

    def to_dict(self) -> dict:
        """The stats document (JSON-serialisable)."""
        with self._lock:
            return {"version": STATS_VERSION, "settings": dict(self.settings), "sources": dict(self.sources),
                    "seconds": dict(self.seconds), "experts": {k: dict(v) for k, v in self.experts.items()},
                    "decode": dict(self.decode), "memory": {k: list(v) for k, v in self.memory.items()},
                    "caches": {k: dict(v) for k, v in self.caches.items()},
                    "layout": dict(self.layout), "retries": self.retries}
