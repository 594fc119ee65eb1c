"""Operational metrics: the one place Relay records them, and the sinks that export them.

The engine records what happens as it happens -- a request ends, a job waits, a step runs on a
group, a group is busy, a group is rebuilt, forwards run or are answered by a cache, a state
is handed to another group, the gRPC and HTTP front ends answer -- by calling the process-wide
:data:`RECORDER` with one of the metrics declared in :data:`DEFINITIONS`. Nothing is recorded
anywhere else, and recording costs a dictionary lookup while no sink is attached. An exporter
(the Prometheus one: :mod:`serve.metrics`, ``relay serve --metrics-port``) is a sink: it
receives every record and keeps its own state.

Labels never carry a prompt, a token or a request id (their values are few: model names, group
names, experts, outcomes, methods, routes and status codes).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
#: Seconds buckets of a whole request (a tiny model's second to a 720p A14B video's half hour).
REQUEST_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: Seconds buckets of one denoise step or one front-end call.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class Metric:
    """One metric: its Prometheus-style name, kind, help text and label names."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None


DEFINITIONS: dict[str, Metric] = {m.name: m for m in (
    Metric("relay_requests_total", COUNTER, "Requests that ended, by model and outcome "
           "(succeeded, failed, cancelled, rejected)", ("model", "outcome")),
    Metric("relay_queue_depth", GAUGE, "Jobs waiting for a worker group, by model", ("model",)),
    Metric("relay_request_seconds", HISTOGRAM, "Seconds from admission to the end of a request that "
           "succeeded, by model", ("model",), REQUEST_BUCKETS),
    Metric("relay_step_seconds", HISTOGRAM, "Seconds of one denoise step on a worker group, by group and "
           "expert", ("group", "expert"), STEP_BUCKETS),
    Metric("relay_stage_busy_seconds_total", COUNTER, "Seconds a worker group spent running requests "
           "(encode, denoise steps, hand-offs in, decode)", ("group",)),
    Metric("relay_group_restarts_total", COUNTER, "Worker group rebuilds (after a failure, an "
           "out-of-memory error or a failed health check)", ("group",)),
    Metric("relay_group_retired", GAUGE, "1 while a worker group is out of service (it failed too often, or "
           "could not be rebuilt and tries again every --rebuild-retry seconds), else 0", ("group",)),
    Metric("relay_forwards_total", COUNTER, "Transformer forwards by expert: computed, or skipped "
           "(answered by a feature cache)", ("expert", "kind")),
    Metric("relay_handoff_bytes_total", COUNTER, "Bytes of denoise states shipped to another worker "
           "group (staged placements, retries)"),
    Metric("relay_grpc_requests_total", COUNTER, "gRPC calls by method and status code", ("method", "code")),
    Metric("relay_grpc_request_seconds", HISTOGRAM, "Seconds of a gRPC call (a Generate stream: until "
           "its last message), by method", ("method",), REQUEST_BUCKETS),
    Metric("relay_http_requests_total", COUNTER, "HTTP requests by route and status code", ("route", "status")),
    Metric("relay_http_request_seconds", HISTOGRAM, "Seconds of an HTTP request until its last byte (an "
           "event stream: until it ends), by route", ("route",), REQUEST_BUCKETS),
)}


class Recorder:
    """Hands each record to every attached sink (``sink.record(metric, op, value, labels)``
    with ``op`` ``inc``, ``set`` or ``observe``). Thread-safe; a failing sink is detached from
    the record that failed only (it is logged, and the engine goes on)."""

    def __init__(self) -> None:
        self._sinks: list = []
        self._lock = threading.Lock()

    def add_sink(self, sink) -> None:
        """Attaches ``sink``."""
        with self._lock:
            self._sinks = [*self._sinks, sink]

    def remove_sink(self, sink) -> None:
        """Detaches ``sink`` (no-op when it is not attached)."""
        with self._lock:
            self._sinks = [s for s in self._sinks if s is not sink]

    @property
    def active(self) -> bool:
        """Whether any sink is attached (callers may skip computing a value when not)."""
        return bool(self._sinks)

    def _record(self, name: str, op: str, value: float, labels: Mapping[str, str]) -> None:
        sinks = self._sinks
        if not sinks:
            return
        metric = DEFINITIONS[name]
        if set(labels) != set(metric.labels):
            raise ValueError(f"{name} takes labels {metric.labels}, got {sorted(labels)}")
        clean = {key: str(value_) for key, value_ in labels.items()}
        for sink in sinks:
            try:
                sink.record(metric, op, float(value), clean)
            except Exception:  # noqa: BLE001 - an exporter's bug must not fail a request
                import logging

                logging.getLogger(__name__).exception("metrics sink %r failed on %s", sink, name)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        """Adds ``value`` to counter ``name``."""
        self._record(name, "inc", value, labels)

    def set(self, name: str, value: float, **labels) -> None:
        """Sets gauge ``name``."""
        self._record(name, "set", value, labels)

    def observe(self, name: str, value: float, **labels) -> None:
        """Adds an observation to histogram ``name``."""
        self._record(name, "observe", value, labels)


#: The process-wide recorder the engine, the scheduler and the front ends record into.
RECORDER = Recorder()


def state_bytes(state) -> int:
    """Bytes of the tensors in a :class:`engine.state.DenoiseState` (what a hand-off ships)."""
    import torch

    total = 0

    def walk(value) -> None:
        nonlocal total
        if torch.is_tensor(value):
            total += value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif hasattr(value, "__dataclass_fields__"):
            for key in value.__dataclass_fields__:
                walk(getattr(value, key))

    walk(state)
    return total
