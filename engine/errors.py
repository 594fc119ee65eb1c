"""Errors that carry the name of the offending field, so every front end can report it."""

from __future__ import annotations


class ValidationError(ValueError):
    """A request field is invalid. Raised before any model weights are touched.

    Attributes:
        field: The request field at fault, spelled as in :class:`engine.request.GenerationRequest`.
        message: What is wrong, in plain words.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelError(RuntimeError):
    """A model directory is missing, incomplete or not a Wan 2.x diffusers layout."""


class OutOfMemory(MemoryError):
    """A rank ran out of device or host memory (raised by the worker after it freed what it held).

    Attributes:
        rank: The rank that failed (global rank in its group).
        device: Its device (``cuda:1``, ``cpu``).
        method: What it was doing: ``setup`` (loading), ``prepare``, ``advance``, ``decode``...
        detail: The allocator's own words (first line).
        in_use_bytes: Bytes the device (or host) had in use when it failed, if known.
        total_bytes: The device's (or host's) total bytes, if known.
    """

    def __init__(self, rank: int, device: str, method: str, detail: str,
                 in_use_bytes: int | None = None, total_bytes: int | None = None) -> None:
        self.rank, self.device, self.method, self.detail = rank, device, method, detail
        self.in_use_bytes, self.total_bytes = in_use_bytes, total_bytes
        super().__init__(rank, device, method, detail, in_use_bytes, total_bytes)

    def where(self) -> str:
        """``rank 1 (cuda:1, 79.1 of 80.0 GiB in use) while loading``."""
        memory = ""
        if self.in_use_bytes is not None and self.total_bytes:
            memory = f", {self.in_use_bytes / 2**30:.1f} of {self.total_bytes / 2**30:.1f} GiB in use"
        doing = {"setup": "loading the model", "prepare": "encoding", "advance": "denoising",
                 "begin": "starting the denoise", "decode": "decoding"}.get(self.method, self.method)
        return f"rank {self.rank} ({self.device}{memory}) while {doing}"

    def __str__(self) -> str:
        return f"out of memory on {self.where()}: {self.detail}"
