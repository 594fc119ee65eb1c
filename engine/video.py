"""Writing generated frames: ``.npy`` (float32 ``(F, H, W, 3)`` in [0, 1]) or H.264 ``.mp4``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

OUTPUT_SUFFIXES = (".mp4", ".npy")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding to nearest."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_mp4(frames: np.ndarray, *, fps: int, crf: int = 16) -> bytes:
    """Encodes frames as H.264 / yuv420p mp4 at ``fps``, in memory.

    Uses PyAV (FFmpeg linked in-process), so a threaded server never forks an encoder process.
    """
    import io

    import av

    pixels = to_uint8(frames)
    _, height, width, _ = pixels.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_mp4(frames: np.ndarray, path: str | os.PathLike, *, fps: int) -> None:
    """Writes frames to ``path`` as H.264 mp4 at ``fps`` (see :func:`encode_mp4`)."""
    Path(path).write_bytes(encode_mp4(frames, fps=fps))


def write_output(frames: np.ndarray, path: str | os.PathLike, *, fps: int) -> Path:
    """Writes ``frames`` to ``path``; the format follows the suffix (``.mp4`` or ``.npy``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, np.asarray(frames, dtype=np.float32))
    elif path.suffix == ".mp4":
        write_mp4(frames, path, fps=fps)
    else:
        raise ValueError(f"output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {path.name!r}")
    return path
