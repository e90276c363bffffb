"""``animate``: a portrait, one or more attribute images and a driving video (or a motion
preset) → an animated portrait wearing the attributes (method note §4).

* composition: N attributes in one pass (each through ARNet with its own mask; the portrait
  mask is the union of all of them, aligned into portrait coordinates);
* interpolation: exactly two attributes and ``alpha`` (a constant) or ``alpha_ramp`` (0 → 1
  over the frames, morphing from the first attribute to the second);
* driving: a video's landmark motion retargeted onto the portrait's face, or a preset;
* long videos: the pipeline's overlapping temporal windows (time linear in length); the
  reference nets run once per call;
* identity: a model that reads a face embedding (dlib / ArcFace) gets the portrait's
  (:meth:`Preparer.identity_embedding`; ArcFace's ONNX file from ``Preparer(arcface_model=…)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from durian.data.keypoints import render_keypoint_sequence
from durian.inference.errors import DurianInputError
from durian.inference.prepare import (
    ImageSource,
    PreparedAttribute,
    PreparedFace,
    Preparer,
    check_alpha,
    check_attribute_category,
    portrait_mask,
)
from durian.inference.presets import PRESETS, preset_landmarks
from durian.inference.retarget import extend_to_length, retarget_landmarks

if TYPE_CHECKING:
    from durian.pipelines.pipeline_durian import DurianPipeline

PRESET_FPS = 12.0  # frame rate of preset motion (the sample data's rate)
PRESET_FRAMES = 24  # preset length when no frame count is asked for

AttributeSpec = tuple[ImageSource, str | None]


@dataclass
class Animation:
    frames: np.ndarray  # (F, H, W, 3) uint8: the result, or the side-by-side panel
    fps: float
    keypoints: np.ndarray  # (F, S, S, 3) uint8: the driving keypoint images used
    portrait_mask: np.ndarray  # (S, S) bool: M_port
    alpha: np.ndarray | None  # (F,) interpolation weights, None for composition
    portrait: PreparedFace  # the portrait as the model saw it (crop, landmarks, parsing)
    attributes: list[PreparedAttribute]  # each attribute's crop, category and mask

    @property
    def categories(self) -> list[str]:
        """The category of each attribute (given or inferred)."""
        return [a.category for a in self.attributes]


def is_preset(driving: str | os.PathLike) -> bool:
    """A preset name (not an existing file of that name)."""
    return str(driving) in PRESETS and not Path(driving).exists()


def check_driving(driving: str | os.PathLike) -> None:
    """Fail early, before any model work, if ``driving`` is neither a preset nor a file."""
    if is_preset(driving) or Path(driving).is_file():
        return
    p = Path(driving)
    if p.suffix or os.sep in str(driving) or "/" in str(driving):
        raise DurianInputError(f"cannot read driving video '{p.name}': file not found ({p})")
    raise DurianInputError(
        f"driving {str(driving)!r} is neither a video file nor a preset "
        f"(presets: {', '.join(PRESETS)})"
    )


def alpha_schedule(alpha: float | None, alpha_ramp: bool, num_frames: int) -> np.ndarray | None:
    """Per-frame interpolation weights: a constant, a 0 → 1 ramp, or None (composition)."""
    if alpha_ramp:
        return np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    if alpha is None:
        return None
    return np.full(num_frames, float(alpha))


def _tile(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Several images in one size×size grid cell."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cell = size // max(cols, rows)
    out = np.zeros((size, size, 3), np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        small = cv2.resize(im, (cell, cell), interpolation=cv2.INTER_AREA)
        out[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = small
    return out


def side_by_side_frames(
    portrait: np.ndarray,
    attributes: Sequence[np.ndarray],
    driving: np.ndarray,
    result: np.ndarray,
) -> np.ndarray:
    """(F, S, 4S, 3) frames: portrait | attribute(s) | driving | result."""
    f, s = result.shape[:2]
    if driving.shape[1:3] != (s, s):
        driving = np.stack([cv2.resize(d, (s, s), interpolation=cv2.INTER_AREA) for d in driving])
    left = np.concatenate([cv2.resize(portrait, (s, s)), _tile(attributes, s)], axis=1)
    return np.concatenate(
        [np.broadcast_to(left, (f, s, 2 * s, 3)), driving[:f], result], axis=2
    ).astype(np.uint8)


def driving_landmarks(
    preparer: Preparer,
    portrait: PreparedFace,
    driving: str | os.PathLike,
    num_frames: int | None,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(F, 478, 3) keypoint landmarks in portrait coordinates, the driver's face crops (None for
    a preset) and the frame rate. A video shorter than ``num_frames`` plays back and forth."""
    if is_preset(driving):
        n = num_frames or PRESET_FRAMES
        return preset_landmarks(str(driving), portrait.landmarks, n, PRESET_FPS), None, PRESET_FPS
    video = preparer.driving_video(driving, max_frames=num_frames)
    lms = retarget_landmarks(video.landmarks, portrait.landmarks)
    crops = video.crops
    if num_frames is not None and len(lms) < num_frames:
        lms = extend_to_length(lms, num_frames)
        crops = extend_to_length(crops, num_frames)
    return lms, crops, video.fps


def animate(
    pipeline: DurianPipeline,
    portrait: ImageSource,
    attributes: Sequence[AttributeSpec],
    driving: str | os.PathLike,
    *,
    alpha: float | None = None,
    alpha_ramp: bool = False,
    frames: int | None = None,
    steps: int = 25,
    guidance: float = 3.5,
    seed: int = 0,
    side_by_side: bool = False,
    preparer: Preparer | None = None,
    window: int | None = 24,
    overlap: int = 4,
    progress: bool = True,
    arcface_model: str | os.PathLike | None = None,
) -> Animation:
    """Animate ``portrait`` with ``attributes`` [(image, category or None), …] following
    ``driving`` (a video path or a preset name, see :data:`PRESETS`).

    ``alpha`` / ``alpha_ramp``: interpolation between exactly two attributes; otherwise all
    attributes are composed. ``frames``: output length (default: the whole video, or 24 frames
    of a preset). ``arcface_model``: the ONNX file of a model that reads ArcFace embeddings
    (when no ``preparer`` brings its own). Raises :class:`DurianInputError` for bad inputs."""
    attributes = list(attributes)
    if not attributes:
        raise DurianInputError("give at least one attribute image")
    check_alpha(alpha, alpha_ramp, len(attributes))
    attributes = [
        (img, None if cat in (None, "", "auto") else check_attribute_category(cat, img))
        for img, cat in attributes
    ]
    check_driving(driving)
    if frames is not None and frames < 1:
        raise DurianInputError(f"frames must be at least 1, got {frames}")
    if steps < 1:
        raise DurianInputError(f"steps must be at least 1, got {steps}")

    size = int(pipeline.model.config.resolution)
    own = preparer is None
    prep = preparer or Preparer(size, arcface_model=arcface_model)
    if prep.size != size:
        raise ValueError(f"preparer crops at {prep.size} but the model works at {size}")
    try:
        bar = tqdm(total=len(attributes) + 2, desc="preparing", disable=not progress)
        with bar:
            face = prep.face(portrait, "portrait")
            identity = prep.identity_embedding(face, pipeline.model.config)
            bar.update()
            prepared: list[PreparedAttribute] = []
            for k, (img, cat) in enumerate(attributes):
                prepared.append(prep.attribute(img, cat, f"attribute {k + 1}"))
                bar.update()
            lms, driver_crops, fps = driving_landmarks(prep, face, driving, frames)
            bar.update()
    finally:
        if own:
            prep.close()

    keypoints = render_keypoint_sequence(lms, (size, size))
    m_port = portrait_mask(face, prepared)
    weights = alpha_schedule(alpha, alpha_ramp, len(keypoints))
    images = [a.face.image for a in prepared]
    masks = [a.mask for a in prepared]
    kwargs: dict = {}
    if weights is not None:
        kwargs = {
            "attribute_image_2": [images[1]],
            "attribute_mask_2": [masks[1]],
            "alpha": weights.tolist(),
        }
        images, masks = images[:1], masks[:1]
    pipeline.set_progress_bar_config(desc="denoising", disable=not progress)
    result = pipeline(
        face.image,
        m_port,
        images,
        masks,
        keypoints,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(int(seed)),
        window=window,
        overlap=overlap,
        output_type="np",
        identity_embedding=None if identity is None else torch.from_numpy(identity),
        **kwargs,
    ).frames
    out = result
    if side_by_side:
        drv = driver_crops if driver_crops is not None else keypoints
        out = side_by_side_frames(face.image, [a.face.image for a in prepared], drv, result)
    return Animation(out, fps, keypoints, m_port, weights, face, prepared)


__all__ = [
    "Animation",
    "animate",
    "alpha_schedule",
    "check_driving",
    "driving_landmarks",
    "is_preset",
    "side_by_side_frames",
]
