"""Small drawn clips for the data tests: a face-like template whose landmarks, labels and
pixels all move together, so masks, landmarks and images stay mutually consistent."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from project_helpers import write_clip_shards

from preprocessing.labels import CLASS
from durian.data.clip_codec import Clip, encode_clip


def template_landmarks(size: int, seed: int = 0) -> np.ndarray:
    """478 landmarks scattered over the central face area of a size×size crop."""
    rng = np.random.default_rng(seed)
    pts = np.empty((478, 3), np.float32)
    pts[:, 0] = rng.uniform(0.3, 0.7, 478) * size
    pts[:, 1] = rng.uniform(0.35, 0.8, 478) * size
    pts[:, 2] = rng.uniform(-0.05, 0.05, 478)
    return pts


def make_clip(
    num_frames: int = 12,
    size: int = 32,
    categories: tuple[str, ...] = ("hair",),
    identity: str = "id0",
    seed: int = 0,
    absent_frames: tuple[int, ...] = (),
) -> Clip:
    """A head drifting right by one pixel every other frame; ``categories`` drawn on it (hair as a
    cap, glasses as a band over the eyes, hat on top); ``absent_frames`` show no attribute."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    parsing = np.zeros((num_frames, size, size), np.uint8)
    base = template_landmarks(size, seed)
    landmarks = np.repeat(base[None], num_frames, axis=0)
    colors = rng.integers(40, 255, size=(4, 3))
    for t in range(num_frames):
        dx = t // 2
        labels = np.zeros((size, size), np.uint8)
        cx, cy, r = size // 2 + dx, size // 2 + size // 10, size // 4
        cv2.circle(labels, (cx, cy), r, CLASS["skin"], -1)
        if t not in absent_frames:
            if "hair" in categories:
                cv2.ellipse(labels, (cx, cy - r // 2), (r + 2, r), 0, 180, 360, CLASS["hair"], -1)
            if "hat" in categories:
                cv2.rectangle(labels, (cx - r, 0), (cx + r, max(cy - r - 1, 1)), CLASS["hat"], -1)
            if "glasses" in categories:
                cv2.rectangle(labels, (cx - r, cy - 2), (cx + r, cy + 1), CLASS["eye_g"], -1)
        parsing[t] = labels
        palette = np.zeros((256, 3), np.uint8)
        palette[CLASS["skin"]] = colors[0]
        palette[CLASS["hair"]] = colors[1]
        palette[CLASS["hat"]] = colors[2]
        palette[CLASS["eye_g"]] = colors[3]
        frames[t] = palette[labels]
        frames[t][labels == 0] = 20  # a dim background, distinct from masked-out black
        landmarks[t, :, 0] += dx
    meta = {"identity": identity, "fps": 25.0, "clip_index": 0}
    return Clip(frames, parsing, landmarks, meta)


def write_shards(
    directory: Path, clips_per_shard: int, num_shards: int, size: int = 32, num_frames: int = 12
) -> list[str]:
    """``num_shards`` tar shards of drawn clips with keys ``vid<shard>_<clip:04d>``."""
    return write_clip_shards(
        directory, num_shards, clips_per_shard,
        lambda s, c: make_clip(
            num_frames=num_frames,
            size=size,
            categories=("hair", "glasses"),
            identity=f"id{s}_{c}",
            seed=100 * s + c,
        ),
    )
