"""The sample data set: short, deterministic portrait videos that exercise the whole pipeline.

- Real photographs (public domain, shipped in installed packages: scikit-image's
  ``astronaut`` and matplotlib's ``grace_hopper.jpg``), animated with a small synthetic head
  motion by affine warps, so a real face detector and landmarker see real faces.
- Procedurally drawn portraits (``synthetic``) of several identities with
  different attributes, each with a ground-truth sidecar ``<name>.gt.npz`` holding
  ``landmarks`` (T,478,3 float32, pixel coordinates of the video frame) and ``parsing``
  (T,H,W uint8 label maps), aligned frame for frame with the MP4.
- A cross-identity evaluation set (:func:`cross_identity_eval_set`).

Everything is a pure function of its arguments; files are written atomically, so a file
that exists is whole, and a stopped run can be continued (``keep_existing``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from preprocessing.labels import LABELS
from preprocessing.video import write_video
from synthetic.params import (
    SYNTH_CATEGORIES,
    random_attributes,
    random_background,
    random_identity,
    random_motion,
)
from synthetic.render import render_video
from synthetic.transfer import make_transfer_cases, save_transfer_cases

GT_SUFFIX = ".gt.npz"


def _astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.ascontiguousarray(mpimg.imread(f, format="jpg")[..., :3])


# name -> (loader, face centre (x, y) in source pixels, crop height in source pixels)
REAL_PHOTOS: dict[str, tuple[Callable[[], np.ndarray], tuple[float, float], float]] = {
    "astronaut": (_astronaut, (238.0, 135.0), 270.0),
    "grace_hopper": (_grace_hopper, (265.0, 255.0), 420.0),
}


def sidecar_path(video: str | os.PathLike) -> Path:
    """``<dir>/<name>.mp4`` → ``<dir>/<name>.gt.npz``."""
    video = Path(video)
    return video.with_name(video.stem + GT_SUFFIX)


def animate_photo(image: np.ndarray, center: tuple[float, float], crop_height: float,
                  n_frames: int, size: int, seed: int) -> np.ndarray:
    """(T, size, 3/4·size, 3) uint8: a portrait crop of ``image`` with a smooth head-like
    motion (translation, in-plane rotation, zoom of a few percent) about the face centre."""
    height, width = size, _even(round(size * 3 / 4))
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) / max(n_frames - 1, 1)

    def track(amplitude: float) -> np.ndarray:
        phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.4)
        return amplitude * np.sin(2 * np.pi * freq * t + phase)

    angle, zoom = track(4.0), 1 + track(0.04)
    dx, dy = track(0.04 * width), track(0.03 * height)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for i in range(n_frames):
        m = cv2.getRotationMatrix2D(center, float(angle[i]), float(zoom[i] * height / crop_height))
        m[:, 2] += (width / 2 - center[0] + dx[i], height / 2 - center[1] + dy[i])
        frames[i] = cv2.warpAffine(image, m, (width, height), flags=cv2.INTER_AREA
                                   if zoom[i] * height < crop_height else cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
    return frames


def _even(n: int) -> int:
    return int(n) - int(n) % 2


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def real_clip(name: str, n_frames: int, size: int, seed: int) -> np.ndarray:
    """The animated frames of one of :data:`REAL_PHOTOS` (before encoding)."""
    load, center, crop_height = REAL_PHOTOS[name]
    j = list(REAL_PHOTOS).index(name)
    return animate_photo(load(), center, crop_height, n_frames, size, seed * 1009 + j)


def synthetic_clip(i: int, n_frames: int, size: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Synthetic clip ``i`` of a sample: frames, parsing, landmarks and its parameters."""
    rng = np.random.default_rng([seed, 7919, i])
    identity = random_identity(rng)
    # Cycle a guaranteed category so even a small sample shows every attribute kind.
    attributes = random_attributes(rng, {SYNTH_CATEGORIES[i % len(SYNTH_CATEGORIES)]: 1.0})
    motion = random_motion(rng, n_frames)
    background = random_background(rng)
    frames, labels, landmarks = render_video(identity, attributes, motion, size, background)
    meta = {"identity": asdict(identity), "attributes": attributes.to_dict(),
            "background": asdict(background), "motion": motion.to_dict(),
            "generator": "synthetic", "seed": [seed, 7919, i]}
    return frames, labels, landmarks, meta


# Lossless H.264: lossy x264 output varies from run to run here, and the sample must be
# byte-identical so its content hashes (video ids, hence the train/val split) repeat.
SAMPLE_CRF = 0


def sample_videos(n_synthetic: int, real_photos: bool = True) -> list[str]:
    """The file names of a sample's videos, in the order :func:`generate_sample` writes them."""
    real = [f"real_{name}.mp4" for name in REAL_PHOTOS] if real_photos else []
    return real + [f"synth_{i:03d}.mp4" for i in range(n_synthetic)]


def sample_files(n_synthetic: int, real_photos: bool = True) -> list[str]:
    """Every file name of a sample: the videos and the synthetic ones' sidecars."""
    names = sample_videos(n_synthetic, real_photos)
    return names + [sidecar_path(n).name for n in names if n.startswith("synth_")]


def generate_sample(
    out_dir: str | os.PathLike,
    *,
    n_synthetic: int,
    n_frames: int,
    size: int,
    fps: float,
    seed: int,
    real_photos: bool = True,
    keep_existing: bool = False,
    on_video: Callable[[Path, bool], None] | None = None,
) -> list[Path]:
    """Write the sample videos into ``out_dir`` and return their paths (MP4s, sorted).

    Real photos: ``real_<name>.mp4`` (height ``size``, width 3/4 of it). Synthetic:
    ``synth_<i>.mp4`` (size × size) with ``synth_<i>.gt.npz`` sidecars (written first, so a
    synthetic video never exists without its ground truth). Existing files of the same
    names are overwritten: the content is a function of the arguments. With
    ``keep_existing`` a video already there (with its sidecar) is kept instead: the caller
    vouches it was made with the same arguments (a stopped run being continued).
    ``on_video(path, kept)`` is called once each video is in place.
    """
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32 (H.264 4:2:0), got {size}")
    if n_frames < 1 or n_synthetic < 0:
        raise ValueError("n_frames must be >= 1 and n_synthetic >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def done(video: Path, kept: bool) -> None:
        written.append(video)
        if on_video is not None:
            on_video(video, kept)

    for name in sample_videos(n_synthetic, real_photos):
        video = out / name
        kind, _, stem = video.stem.partition("_")
        if keep_existing and video.is_file() and (
                kind == "real" or sidecar_path(video).is_file()):
            done(video, True)
        elif kind == "real":
            frames = real_clip(stem, n_frames, size, seed)
            done(write_video(video, frames, fps, crf=SAMPLE_CRF), False)
        else:
            frames, labels, landmarks, meta = synthetic_clip(int(stem), n_frames, size, seed)
            _write_npz(sidecar_path(video), landmarks=landmarks, parsing=labels,
                       classes=np.array(LABELS), meta=np.array(json.dumps(meta)))
            done(write_video(video, frames, fps, crf=SAMPLE_CRF), False)
    return sorted(written)


def cross_identity_eval_set(out_dir: str | os.PathLike, n: int, n_frames: int, size: int,
                            seed: int) -> Path:
    """Write ``n`` cross-identity transfer cases with exact targets; returns the index.json."""
    return save_transfer_cases(make_transfer_cases(n, n_frames, size, seed), out_dir)
