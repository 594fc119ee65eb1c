"""Writing generated videos: ``.npy`` (float32 ``(F, H, W, 3)`` in [0, 1], and a ``.wav`` beside
it when the video has sound) or H.264 ``.mp4`` (with an AAC track when it has sound).

A decode gives a :class:`Clip`: the frames, and for a model with an audio stream (LTX-2) the
waveform and its sample rate."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ctypes.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OUTPUT_SUFFIXES = (".mp4", ".npy")
#: AAC bit rate of a sound track (per channel pair; the generated audio is 44.1-48 kHz stereo or mono).
AAC_BIT_RATE = 192_000


@dataclass(frozen=True, eq=False)
class Clip:
    """A decoded video.

    Attributes:
        frames: float32 ``(F, H, W, 3)`` in [0, 1].
        audio: float32 ``(channels, samples)`` in [-1, 1], or ``None`` for a silent model.
        sample_rate: Samples per second of ``audio``.
    """

    frames: np.ndarray
    audio: np.ndarray | None = None
    sample_rate: int | None = None

    def __post_init__(self) -> None:
        if (self.audio is None) != (self.sample_rate is None):
            raise ValueError("a clip's audio and sample_rate go together")


def as_clip(media) -> Clip:
    """``media`` as a :class:`Clip` (frames alone become a silent clip)."""
    return media if isinstance(media, Clip) else Clip(frames=np.asarray(media))


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding to nearest."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: x264 worker threads, fixed: x264 output is deterministic for a given thread count, and
#: ``auto`` would make the bytes depend on the machine's cores.
X264_THREADS = 4
#: ITU-R BT.709 in FFmpeg's numbering (primaries, transfer, matrix).
BT709 = 1


def encode_mp4(frames: np.ndarray, *, fps: int, crf: int = 16, audio: np.ndarray | None = None,
               sample_rate: int | None = None) -> bytes:
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

    ``audio`` (float ``(channels, samples)`` in [-1, 1], at ``sample_rate``) becomes an AAC track
    (FFmpeg's native encoder, :data:`AAC_BIT_RATE`), starting with the first frame.
    """
    with _filled_allocations():
        return _encode(to_uint8(frames), fps=fps, crf=crf, audio=audio, sample_rate=sample_rate)


def _encode(pixels: np.ndarray, *, fps: int, crf: int, audio: np.ndarray | None = None,
            sample_rate: int | None = None) -> bytes:
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
            # Every stream exists before the first packet is muxed (that writes the header).
            sound = _audio_stream(container, audio, sample_rate) if audio is not None else None
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
            if sound is not None:
                _mux_audio(container, *sound, sample_rate)
        return path.read_bytes()


def _audio_stream(container, audio: np.ndarray, sample_rate: int):
    """An AAC stream for ``audio`` in ``container``, and the samples clipped as ``(channels, n)``."""
    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    if samples.ndim == 1:
        samples = samples[None]
    channels = samples.shape[0]
    if channels not in (1, 2):
        raise ValueError(f"audio must be mono or stereo, got {channels} channels")
    stream = container.add_stream("aac", rate=int(sample_rate))
    stream.layout = "stereo" if channels == 2 else "mono"
    stream.bit_rate = AAC_BIT_RATE if channels == 2 else AAC_BIT_RATE // 2
    return stream, samples


def _mux_audio(container, stream, samples: np.ndarray, sample_rate: int) -> None:
    """Encodes ``samples`` into the AAC ``stream`` (planar float, in the codec's frame size)."""
    import av

    size = stream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], size):
        chunk = np.ascontiguousarray(samples[:, start:start + size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
        frame.sample_rate, frame.pts = int(sample_rate), start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def encode_wav(audio: np.ndarray, sample_rate: int) -> bytes:
    """``audio`` (float ``(channels, samples)`` in [-1, 1]) as a 16-bit PCM WAV file."""
    import io
    import wave

    samples = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    if samples.ndim == 1:
        samples = samples[None]
    pcm = np.round(samples.T * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(samples.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


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


def write_output(media, path: str | os.PathLike, *, fps: int) -> Path:
    """Writes ``media`` (frames or a :class:`Clip`) to ``path``; the format follows the suffix:
    ``.mp4`` (with its AAC track), or ``.npy`` of the frames with the sound as ``.wav`` beside it
    (same stem)."""
    clip = as_clip(media)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, np.asarray(clip.frames, dtype=np.float32))
        if clip.audio is not None:
            path.with_suffix(".wav").write_bytes(encode_wav(clip.audio, clip.sample_rate))
    elif path.suffix == ".mp4":
        path.write_bytes(encode_mp4(clip.frames, fps=fps, audio=clip.audio, sample_rate=clip.sample_rate))
    else:
        raise ValueError(f"output must end in {' or '.join(OUTPUT_SUFFIXES)}, got {path.name!r}")
    return path
