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
