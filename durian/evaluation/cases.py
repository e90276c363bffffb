"""Evaluation cases: a portrait, an attribute reference, driving keypoints and the exact
target frames, with the masks the model gets at inference.

* self-attribute transfer (method note §5): identity and attribute references from one clip of
  a held-out identity, the other frames as ground truth;
* cross-identity transfer: portrait of X, attribute of Y, target = X wearing Y's attribute —
  exact on the synthetic portraits (built by ``synthetic``).

The portrait's candidate region is its own attribute region united with the attribute
reference's mask moved into portrait coordinates (method note §4), as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from durian.data.clip_codec import Clip
from durian.data.keypoints import render_keypoint_sequence
from durian.data.masks import align_mask, attribute_mask, categories_present
from durian.evaluation.metrics import landmark_distance, region_metrics, temporal_flicker
from preprocessing.labels import CATEGORIES


@dataclass
class EvalCase:
    key: str
    category: str
    portrait: np.ndarray  # (H, W, 3) uint8
    portrait_mask: np.ndarray  # (H, W) bool: the candidate transfer region M_port
    attribute: np.ndarray  # (H, W, 3) uint8
    attribute_mask: np.ndarray  # (H, W) bool: M_attr
    keypoints: np.ndarray  # (F, H, W, 3) uint8 rendered driving landmarks
    target: np.ndarray  # (F, H, W, 3) uint8 ground truth
    target_attribute_mask: np.ndarray  # (F, H, W) bool: attribute region of each target
    driving_landmarks: np.ndarray  # (F, 478, 3) the landmarks the keypoints were drawn from
    portrait_landmarks: np.ndarray  # (478, 3)
    attribute_landmarks: np.ndarray  # (478, 3)


def make_eval_case(
    key: str,
    category: str,
    portrait: tuple[np.ndarray, np.ndarray, np.ndarray],
    attribute: tuple[np.ndarray, np.ndarray, np.ndarray],
    target: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> EvalCase:
    """Each of ``portrait``/``attribute`` is (image, labels, landmarks) of one frame; ``target``
    the same for F frames. All in the same (crop) resolution."""
    p_img, p_labels, p_lm = portrait
    a_img, a_labels, a_lm = attribute
    t_frames, t_labels, t_lm = target
    h, w = p_img.shape[:2]
    own = attribute_mask(p_labels, category)
    attr = attribute_mask(a_labels, category)
    aligned = align_mask(attr, a_lm, p_lm, (h, w))
    return EvalCase(
        key=key,
        category=category,
        portrait=p_img,
        portrait_mask=own | aligned,
        attribute=a_img,
        attribute_mask=attr,
        keypoints=render_keypoint_sequence(t_lm, (h, w)),
        target=t_frames,
        target_attribute_mask=np.stack([attribute_mask(lab, category) for lab in t_labels]),
        driving_landmarks=np.asarray(t_lm, dtype=np.float32),
        portrait_landmarks=np.asarray(p_lm, dtype=np.float32),
        attribute_landmarks=np.asarray(a_lm, dtype=np.float32),
    )


def self_transfer_case(
    clip: Clip, key: str, num_frames: int = 4, min_fraction: float = 0.005
) -> EvalCase | None:
    """Portrait = first frame, attribute = last frame, targets = frames evenly in between.
    None when the clip shows no attribute in both reference frames."""
    t = clip.num_frames
    if t < 3:
        return None
    id_t, attr_t = 0, t - 1
    shared = set(categories_present(clip.parsing[id_t], min_fraction)) & set(
        categories_present(clip.parsing[attr_t], min_fraction)
    )
    category = next((c for c in CATEGORIES if c in shared), None)
    if category is None:
        return None
    targets = np.unique(np.linspace(1, t - 2, num=min(num_frames, t - 2)).round().astype(int))

    def frame(i):
        return clip.frames[i], clip.parsing[i], clip.landmarks[i]

    return make_eval_case(
        key, category, frame(id_t), frame(attr_t),
        (clip.frames[targets], clip.parsing[targets], clip.landmarks[targets]),
    )


def resize_frames(images: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """N×H×W(×C) frames or masks at ``size`` (area for images, nearest for label masks)."""
    if images.shape[1:3] == size:
        return images
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return np.stack(
        [cv2.resize(im.astype(np.uint8), (size[1], size[0]), interpolation=interp)
         for im in images]
    ).astype(images.dtype)


def targets_at(case: EvalCase, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The target frames and their attribute masks at an output's ``size`` (H, W): what every
    metric compares an output with."""
    target = resize_frames(case.target, size)
    masks = resize_frames(case.target_attribute_mask.astype(np.uint8), size, nearest=True)
    return target, masks.astype(bool)


def case_metrics(case: EvalCase, output: np.ndarray) -> dict[str, float]:
    """Mean over frames of L1/PSNR/SSIM on the whole frame, the attribute region (``_attr``)
    and the identity region (``_id``, everything else), plus the temporal ``flicker``."""
    target, masks = targets_at(case, output.shape[1:3])
    per_frame = [
        region_metrics(out, tgt, {"": None, "attr": m, "id": ~m})
        for out, tgt, m in zip(output, target, masks, strict=True)
    ]
    means = {k: float(np.nanmean([f[k] for f in per_frame])) for k in per_frame[0]}
    return means | {"flicker": temporal_flicker(output, target)}


# Outer eye corners in mediapipe's topology: the inter-ocular distance normalises motion error.
EYE_CORNERS = (33, 263)


def motion_error(case: EvalCase, output_landmarks: np.ndarray, output_size: int) -> float:
    """Landmark distance between the output's detected landmarks (F×478×3 in output pixels,
    NaN where no face was found) and the driving landmarks, in inter-ocular distances."""
    drive = case.driving_landmarks * (output_size / case.target.shape[1])
    iod = np.linalg.norm(drive[:, EYE_CORNERS[0], :2] - drive[:, EYE_CORNERS[1], :2], axis=-1)
    return landmark_distance(output_landmarks, drive, normaliser=iod)

