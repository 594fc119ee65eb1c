"""Writing generated frames: ``.npy`` (float32 ``(F, H, W, 3)`` in [0, 1]) or H.264 ``.mp4``."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ctypes.util
import os
import threading
from pathlib import Path

import numpy as np

OUTPUT_SUFFIXES = (".mp4", ".npy")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding to nearest."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: x264 worker threads, fixed: x264 output is deterministic for a given thread count, and
#: ``auto`` would make the bytes depend on the machine's cores.
X264_THREADS = 4
#: ITU-R BT.709 in FFmpeg's numbering (primaries, transfer, matrix).
BT709 = 1


def encode_mp4(frames: np.ndarray, *, fps: int, crf: int = 16) -> bytes:
    """Encodes frames as H.264 / yuv420p mp4 at ``fps``: the same bytes for the same frames, run
    after run and thread after thread, tagged BT.709 (limited range), ``moov`` first (``+faststart``: a browser
    plays it while it downloads).

    Uses PyAV (FFmpeg linked in-process), so a threaded server never forks an encoder process.
    RGB -> YUV conversion is explicit (BT.709 matrix, exact rounding, one thread) instead of the
    encoder's implicit default (BT.601, threaded); every frame carries its timestamp (frame
    ``i`` at ``i / fps``).

    The encoder libraries read memory they allocated but never wrote (glibc's ``MALLOC_PERTURB_``
    makes the bytes identical): whatever a previous allocation left there changed x264's choices
    whenever other threads of the process were busy (other encodes, a model running), so the
    same frames gave different bytes within one process (the report saw decoded pixels up to
    12/255 apart; here 3-4 different files of 16 encoded four at a time).
    While an encode runs, new allocations are filled with a fixed byte (:func:`_filled_allocations`).
    """
    with _filled_allocations():
        return _encode(to_uint8(frames), fps=fps, crf=crf)


def _encode(pixels: np.ndarray, *, fps: int, crf: int) -> bytes:
    import tempfile
    from fractions import Fraction

    import av
    from av.video.reformatter import ColorRange, Colorspace, Interpolation

    _, height, width, _ = pixels.shape
    exact = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT
    # The faststart pass re-reads the file, which an in-memory buffer does not allow.
    with tempfile.TemporaryDirectory(prefix="relay-mp4-") as folder:
        path = Path(folder) / "video.mp4"
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            codec = stream.codec_context
            codec.color_primaries = codec.color_trc = codec.colorspace = BT709
            codec.color_range = ColorRange.MPEG
            stream.options = {"crf": str(crf), "threads": str(X264_THREADS)}
            for index, frame in enumerate(pixels):
                rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                yuv = rgb.reformat(format="yuv420p", src_colorspace=Colorspace.ITU709,
                                   dst_colorspace=Colorspace.ITU709, src_color_range=ColorRange.JPEG,
                                   dst_color_range=ColorRange.MPEG, interpolation=exact, threads=1)
                yuv.pts, yuv.time_base = index, Fraction(1, fps)
                for packet in stream.encode(yuv):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.read_bytes()


#: glibc's mallopt parameter that fills every allocation with a byte (``MALLOC_PERTURB_``).
_M_PERTURB = -6
_PERTURB_BYTE = 0x5A
_perturb_lock = threading.Lock()
_perturb_users = 0


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


@contextlib.contextmanager
def _filled_allocations():
    """While any encode runs, glibc fills new (and freed) heap blocks with a fixed byte, so the
    memory the encoder reads before writing holds the same bytes every time. Other threads'
    allocations in that window are filled too (a memset each: the window is one encode). A libc
    without ``mallopt`` (not glibc) is left alone."""
    global _perturb_users
    libc = _libc()
    if libc is None:
        yield
        return
    with _perturb_lock:
        _perturb_users += 1
        if _perturb_users == 1:
            libc.mallopt(_M_PERTURB, _PERTURB_BYTE)
    try:
        yield
    finally:
        with _perturb_lock:
            _perturb_users -= 1
            if _perturb_users == 0:
                libc.mallopt(_M_PERTURB, 0)


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
