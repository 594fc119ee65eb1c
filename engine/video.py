"""Writing generated frames: ``.npy`` (float32 ``(F, H, W, 3)`` in [0, 1]) or H.264 ``.mp4``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

OUTPUT_SUFFIXES = (".mp4", ".npy")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding to nearest."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, *, fps: int, quality: int = 8) -> None:
    """Encodes frames as H.264/yuv420p mp4 at ``fps`` with the ffmpeg that imageio-ffmpeg ships."""
    import imageio_ffmpeg

    pixels = to_uint8(frames)
    _, height, width, _ = pixels.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=quality,
        macro_block_size=1, ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in pixels:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


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
