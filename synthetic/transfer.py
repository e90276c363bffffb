"""Cross-identity attribute transfer with exact ground truth.

Real data has no ground truth for "portrait X wearing Y's hair under a driving motion"; the
generator does: it is X's identity rendered with Y's attribute of that category, frame by
frame. A :class:`TransferCase` holds the model's inputs (X's portrait, Y's attribute image,
the driving landmarks) and the exact target video.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthetic.params import (
    SYNTH_CATEGORIES,
    Attributes,
    Background,
    Identity,
    Motion,
    random_attributes,
    random_background,
    random_identity,
    random_motion,
    random_pose,
)
from synthetic.render import SUPERSAMPLE, render_frame, render_video

INDEX_NAME = "index.json"
_ARRAYS = ("portrait", "portrait_labels", "portrait_landmarks", "attribute_image",
           "attribute_labels", "attribute_landmarks", "driving_landmarks", "target_frames",
           "target_labels")


def render_transfer(
    identity_x: Identity,
    attributes_y: Attributes,
    motion: Motion,
    size: int | tuple[int, int],
    background_seed: Background | int = 0,
    *,
    category: str | None = None,
    attributes_x: Attributes | None = None,
    supersample: int = SUPERSAMPLE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """X's identity under ``motion`` wearing Y's attributes: frames, labels, landmarks.

    With ``category`` (and ``attributes_x``), only that category is taken from Y and X keeps
    the rest of its own attributes; without it, all of Y's attributes are used.
    """
    if category is not None:
        attributes = (attributes_x or Attributes()).with_category(category, attributes_y)
    else:
        attributes = attributes_y
    return render_video(identity_x, attributes, motion, size, background_seed,
                        supersample=supersample)


@dataclass
class TransferCase:
    """One cross-identity evaluation case (arrays are uint8 images / float32 landmarks)."""

    case_id: str
    category: str
    identity_x: Identity
    attributes_x: Attributes
    identity_y: Identity
    attributes_y: Attributes
    motion: Motion
    background: Background
    portrait: np.ndarray  # (H,W,3): X with its own attributes, frame 0 of the motion
    portrait_labels: np.ndarray  # (H,W)
    portrait_landmarks: np.ndarray  # (478,3)
    attribute_image: np.ndarray  # (H,W,3): Y with its attributes, its own pose/background
    attribute_labels: np.ndarray
    attribute_landmarks: np.ndarray
    driving_landmarks: np.ndarray  # (T,478,3): X's face under the motion
    target_frames: np.ndarray  # (T,H,W,3): X wearing Y's `category` attribute
    target_labels: np.ndarray  # (T,H,W)

    def meta(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "category": self.category,
            "identity_x": _asdict(self.identity_x),
            "attributes_x": self.attributes_x.to_dict(),
            "identity_y": _asdict(self.identity_y),
            "attributes_y": self.attributes_y.to_dict(),
            "motion": self.motion.to_dict(),
            "background": _asdict(self.background),
            "n_frames": int(len(self.target_frames)),
            "size": list(self.portrait.shape[:2]),
        }


def _asdict(obj) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(obj)


def make_transfer_cases(n: int, n_frames: int, size: int | tuple[int, int],
                        seed: int) -> list[TransferCase]:
    """``n`` cases cycling through the categories the generator draws; case i depends only
    on (seed, i), so a larger ``n`` extends a smaller set."""
    cases = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        category = SYNTH_CATEGORIES[i % len(SYNTH_CATEGORIES)]
        identity_x, identity_y = random_identity(rng), random_identity(rng)
        attributes_x = random_attributes(rng)
        attributes_y = random_attributes(rng, {category: 1.0})
        motion = random_motion(rng, n_frames)
        background = random_background(rng)
        y_pose, y_background = random_pose(rng), random_background(rng)

        portrait, portrait_labels, portrait_lm = render_frame(
            identity_x, attributes_x, motion.pose(0), size, background)
        attr_img, attr_labels, attr_lm = render_frame(
            identity_y, attributes_y, y_pose, size, y_background)
        frames, labels, landmarks = render_transfer(
            identity_x, attributes_y, motion, size, background,
            category=category, attributes_x=attributes_x)
        cases.append(TransferCase(
            case_id=f"case_{i:04d}_{category}", category=category,
            identity_x=identity_x, attributes_x=attributes_x,
            identity_y=identity_y, attributes_y=attributes_y,
            motion=motion, background=background,
            portrait=portrait, portrait_labels=portrait_labels, portrait_landmarks=portrait_lm,
            attribute_image=attr_img, attribute_labels=attr_labels,
            attribute_landmarks=attr_lm, driving_landmarks=landmarks,
            target_frames=frames, target_labels=labels,
        ))
    return cases


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_transfer_cases(cases: list[TransferCase], directory: str | os.PathLike) -> Path:
    """One ``<case_id>.npz`` per case plus ``index.json`` (written last); returns the index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        name = f"{case.case_id}.npz"
        arrays = {k: getattr(case, k) for k in _ARRAYS}
        _atomic_write_bytes(directory / name, lambda f, a=arrays: np.savez_compressed(f, **a))
        entries.append({**case.meta(), "file": name})
    index = directory / INDEX_NAME
    text = json.dumps({"version": 1, "cases": entries}, indent=1)
    _atomic_write_bytes(index, lambda f: f.write(text.encode()))
    return index


def load_transfer_cases(directory: str | os.PathLike) -> list[TransferCase]:
    directory = Path(directory)
    index = json.loads((directory / INDEX_NAME).read_text())
    cases = []
    for entry in index["cases"]:
        with np.load(directory / entry["file"]) as data:
            arrays = {k: data[k] for k in _ARRAYS}
        cases.append(TransferCase(
            case_id=entry["case_id"], category=entry["category"],
            identity_x=Identity.from_dict(entry["identity_x"]),
            attributes_x=Attributes.from_dict(entry["attributes_x"]),
            identity_y=Identity.from_dict(entry["identity_y"]),
            attributes_y=Attributes.from_dict(entry["attributes_y"]),
            motion=Motion.from_dict(entry["motion"]),
            background=Background.from_dict(entry["background"]),
            **arrays,
        ))
    return cases
