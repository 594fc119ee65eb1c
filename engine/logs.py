"""Logging: plain text or one JSON object per line, with the request id on every line about a
request (``relay serve --log-format json``).

A request's id (the service's job id) is held in a context variable while code works on it:
the service sets it for a job's task (and the worker thread it runs on, which inherits the
context), the stage scheduler for each group call it makes for a request. Every log record
made while it is set carries it (``request_id``; ``None`` when no request is being worked on,
and left out of a JSON line then), so lines from the engine, the scheduler and the service
about one request can be joined. Code that logs about a request from elsewhere (a cancel from
another stream) does so inside :func:`request_context`.

Prompts and bearer tokens are never logged; ``relay serve --log-prompts`` adds the prompts to the
one line a job logs when it is admitted.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import time

#: The request being worked on in this context (``None``: none).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("relay_request_id", default=None)
#: How worker processes learn the log format of the process that started them.
FORMAT_ENV = "RELAY_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: ``LogRecord`` attributes that are not extra fields of a log call.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


@contextlib.contextmanager
def request_context(request_id: str | None):
    """Marks the code inside as working on ``request_id``."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def _install_record_factory() -> None:
    """Every log record gets ``request_id`` from the context when it is made (whatever handler
    then sees it: Relay's, pytest's, a library's)."""
    base = logging.getLogRecordFactory()
    if getattr(base, "_relay_request_id", False):
        return

    def factory(*args, **kwargs):
        record = base(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    factory._relay_request_id = True
    logging.setLogRecordFactory(factory)


_install_record_factory()


class RequestIdFilter(logging.Filter):
    """Copies the context's request id onto each record that does not carry one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``pid``, ``request_id`` when there is one, a call's ``extra`` fields, and ``error`` (the
    traceback) for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record comes (never a stream that
    was replaced and closed since, as a test harness's capture is)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ sets it
        pass


_handler: logging.Handler | None = None


def configure(log_format: str = "text", *, level: int = logging.INFO) -> None:
    """Logs ``log_format`` (``text`` or ``json``) lines to stderr at ``level``; worker processes
    started from here follow (:data:`FORMAT_ENV`).

    Like ``logging.basicConfig``, a process whose root logger already has handlers (an
    embedding application, a test harness) keeps them and gets no handler of Relay's; calling
    it again changes the format of the handler it installed."""
    global _handler
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    if _handler is None and not root.handlers:
        _handler = _StderrHandler()
        _handler.addFilter(RequestIdFilter())
        root.addHandler(_handler)
    if _handler is not None:
        _handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.setLevel(level)
    os.environ[FORMAT_ENV] = log_format


def configure_from_env() -> None:
    """In a worker process: the log format of the process that started it, when it set one."""
    log_format = os.environ.get(FORMAT_ENV)
    if log_format in FORMATS and log_format == "json":
        configure(log_format, level=logging.getLogger().level or logging.WARNING)


def json_logging() -> bool:
    """Whether this process logs JSON lines."""
    return os.environ.get(FORMAT_ENV) == "json"
