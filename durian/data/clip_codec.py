"""One clip as stored in a WebDataset shard, and its codec.

A shard sample holds (architecture note):
  ``frames.mp4``     T×H×W×3 uint8 frames, H.264 RGB (``libx264rgb``; crf 0 is lossless)
  ``parsing.npz``    T×H×W uint8 label maps (lossless)
  ``landmarks.npy``  T×478×3 float32 (x, y in crop pixels, z relative), mediapipe topology
  ``identity.npy``   (D,) float32: the clip's identity embedding for the portrait ReferenceNet's
                     cross-attention (dlib 128-d, ArcFace 512-d; ``preprocess.identity_embedder``),
                     computed on one frame of the crop (``json``: ``identity_embedder``, the
                     embedder's name, and ``identity_frame``, the frame, None when no face was
                     found there: then the sample has no ``identity.npy``); absent without an
                     embedder
  ``json``           metadata: source video, identity, clip index, fps, crop boxes, parser, split…
This module is the one place that turns a sample into arrays and back.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

NUM_LANDMARKS = 478


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    parsing: np.ndarray  # (T, H, W) uint8
    landmarks: np.ndarray  # (T, 478, 3) float32
    meta: dict[str, Any] = field(default_factory=dict)
    identity: np.ndarray | None = None  # (D,) float32 identity embedding, when computed

    def __post_init__(self) -> None:
        t, h, w, c = self.frames.shape
        if c != 3 or self.frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be (T,H,W,3) uint8, got {self.frames.shape} {self.frames.dtype}"
            )
        if self.parsing.shape != (t, h, w):
            raise ValueError(f"parsing {self.parsing.shape} does not match frames {(t, h, w)}")
        if self.landmarks.shape[0] != t or self.landmarks.shape[1:] != (NUM_LANDMARKS, 3):
            raise ValueError(f"landmarks must be (T,478,3), got {self.landmarks.shape}")
        if self.identity is not None and np.ndim(self.identity) != 1:
            raise ValueError(f"identity must be one (D,) vector, got {np.shape(self.identity)}")

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def encode_frames(
    frames: np.ndarray, fps: float = 25.0, crf: int = 0, preset: str = "ultrafast"
) -> bytes:
    """H.264 RGB in an MP4 container; crf 0 is bit-exact, higher trades size for loss.
    ``preset``: x264's speed/size trade-off (ultrafast: ~4x faster to write than veryfast at
    256², lossless too, ~35 % more bytes)."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size must be even for H.264, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264rgb", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "rgb24"
        stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}  # repeatable
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode_frames(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames in encoded clip")
    return np.stack(frames)


def encode_clip(key: str, clip: Clip, crf: int = 0, preset: str = "ultrafast") -> dict[str, Any]:
    """A WebDataset sample dict (bytes values) for ``clip``; ``key`` must hold no dots."""
    if "." in key:
        raise ValueError(f"WebDataset keys must not contain dots: {key!r}")
    parsing = io.BytesIO()
    np.savez_compressed(parsing, parsing=clip.parsing.astype(np.uint8))
    landmarks = io.BytesIO()
    np.save(landmarks, clip.landmarks.astype(np.float32))
    fps = float(clip.meta.get("fps", 25.0))
    sample = {
        "__key__": key,
        "frames.mp4": encode_frames(clip.frames, fps=fps, crf=crf, preset=preset),
        "parsing.npz": parsing.getvalue(),
        "landmarks.npy": landmarks.getvalue(),
        "json": json.dumps(clip.meta, sort_keys=True).encode(),
    }
    if clip.identity is not None:
        identity = io.BytesIO()
        np.save(identity, np.asarray(clip.identity, np.float32))
        sample["identity.npy"] = identity.getvalue()
    return sample


def decode_clip(sample: dict[str, Any]) -> Clip:
    """Inverse of :func:`encode_clip`; takes the raw sample as WebDataset yields it."""

    def raw(name: str) -> bytes:
        value = sample[name]
        return value if isinstance(value, bytes | bytearray) else value.read()

    meta = sample["json"]
    if isinstance(meta, bytes | bytearray):
        meta = json.loads(meta)
    with np.load(io.BytesIO(raw("parsing.npz"))) as z:
        parsing = z["parsing"]
    landmarks = np.load(io.BytesIO(raw("landmarks.npy")))
    identity = np.load(io.BytesIO(raw("identity.npy"))) if "identity.npy" in sample else None
    return Clip(decode_frames(raw("frames.mp4")), parsing, landmarks, dict(meta), identity)
