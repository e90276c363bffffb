"""Tiny test media written with PyAV (shared by the preprocessing tests)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def level_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """n flat frames whose grey level encodes the frame index (10, 30, 50, …)."""
    levels = (10 + 20 * np.arange(n)) % 256
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).astype(np.uint8)


def make_video(
    path: Path,
    frames: np.ndarray,
    fps: int = 10,
    pts_ms: list[int] | None = None,
    rotation: int | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    gop: int | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Write frames; ``pts_ms`` gives irregular timestamps (variable frame rate) and
    ``rotation`` a display matrix (counter-clockwise degrees, PyAV's convention)."""
    n, h, w = frames.shape[:3]
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = {"qp": "0", "preset": "ultrafast"}
        if gop:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        fmt = "gray" if frames.ndim == 3 else "rgb24"
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt)
            if pts_ms is not None:
                frame.pts = pts_ms[i]
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        stream.layout = "mono"
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def noise_video(path: Path, n: int = 30, seed: int = 0, **kwargs) -> Path:
    """Random frames: big packets, so byte damage lands in coded picture data."""
    rng = np.random.default_rng(seed)
    return make_video(path, rng.integers(0, 256, (n, 48, 64, 3), dtype=np.uint8), **kwargs)


def damage(src: Path, dest: Path, seed: int = 0) -> Path:
    """Overwrite 2000 bytes a third of the way in with noise (the MP4 index stays intact)."""
    data = bytearray(src.read_bytes())
    at = len(data) // 3
    data[at : at + 2000] = np.random.default_rng(seed).integers(0, 256, 2000, np.uint8).tobytes()
    dest.write_bytes(bytes(data))
    return dest
