"""Self-reconstruction training examples from one clip (method note §3).

From one video: one frame is the attribute reference, another the identity reference, and the
network reconstructs target frame(s) of the same video from them and the targets' keypoints.
Reference frames keep a minimum gap from the targets so the task is not copy-paste.

An example (after :func:`to_torch`, the contract with the model):
  ``target``          F×3×H×W in [-1, 1]
  ``identity_ref``    3×H×W in [-1, 1], ``I_port ⊙ (1 − M_port)``, removed pixels = -1
  ``identity_mask``   1×H×W, ``M_port`` (1 = removed candidate transfer region)
  ``attribute_ref``   3×H×W in [-1, 1], ``I_attr ⊙ M_attr``, masked-out pixels = -1
  ``attribute_mask``  1×H×W, ``M_attr``
  ``keypoints``       F×3×H×W in [0, 1], rendered landmarks of the target frames
  ``drop_identity``, ``drop_attribute``: bool scalars (classifier-free guidance drops; the
  reference images are left intact — the model decides what "dropped" means)
  ``category``, ``key``: str, for logging
  ``identity_embedding`` (D,) float32, the clip's face embedding (the shard's
  ``identity.npy``): only in examples of a loader asked for it (a model that reads one)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from durian.data.augment import apply_affine, color_jitter, random_affine_params
from durian.data.clip_codec import Clip
from durian.data.keypoints import render_keypoint_sequence
from durian.data.masks import (
    MaskExpander,
    attribute_mask,
    attribute_reference,
    categories_present,
    identity_of,
    identity_reference,
)
from durian.data.pair_config import PairConfig
from preprocessing.labels import ATTRIBUTE_CLASSES

TENSOR_KEYS: tuple[str, ...] = (
    "target",
    "identity_ref",
    "identity_mask",
    "attribute_ref",
    "attribute_mask",
    "keypoints",
    "drop_identity",
    "drop_attribute",
)
LIST_KEYS: tuple[str, ...] = ("category", "key")
# Tensors only some loaders put in (all examples of a loader, or none).
OPTIONAL_TENSOR_KEYS: tuple[str, ...] = ("identity_embedding",)


_MAX_WINDOW_TRIES = 4


class NoAttributeError(ValueError):
    """The clip shows no usable attribute category in any admissible reference frame."""


@dataclass(frozen=True)
class FrameChoice:
    target: tuple[int, ...]
    identity: int
    attribute: int
    gap: int  # the minimum gap actually enforced (clamped for short clips)
    candidates: tuple[int, ...]  # every admissible reference frame


def _distance_to_window(frames: np.ndarray, start: int, end: int) -> np.ndarray:
    return np.maximum(np.maximum(start - frames, frames - end), 0)


def sample_frames(
    num_clip_frames: int,
    num_frames: int,
    frame_stride: int,
    min_gap: int,
    rng: np.random.Generator,
) -> FrameChoice:
    """Pick a target window of ``num_frames`` frames and two reference frames at least
    ``min_gap`` frames away from every target frame. For short clips the stride shrinks until
    the window fits (frames repeat if the clip is shorter than the window) and the gap clamps
    to the most the clip allows, so every clip yields an example."""
    t = int(num_clip_frames)
    if t < 1:
        raise ValueError("clip has no frames")
    stride = (
        frame_stride if num_frames == 1 else max(1, min(frame_stride, (t - 1) // (num_frames - 1)))
    )
    length = min((num_frames - 1) * stride + 1, t)
    gap = max(0, min(min_gap, t - length))
    frames = np.arange(t)
    # With gap <= t - length, start 0 always leaves the last frame admissible: never empty.
    starts = [
        s for s in range(t - length + 1)
        if (_distance_to_window(frames, s, s + length - 1) >= gap).any()
    ]  # fmt: skip
    start = int(rng.choice(starts))
    target = tuple(min(start + k * stride, t - 1) for k in range(num_frames))
    candidates = frames[_distance_to_window(frames, start, start + length - 1) >= gap]
    identity = int(rng.choice(candidates))
    others = candidates[candidates != identity] if len(candidates) > 1 else candidates
    attribute = int(rng.choice(others))
    return FrameChoice(target, identity, attribute, gap, tuple(int(c) for c in candidates))


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    shrink = image.shape[0] > h or image.shape[1] > w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if labels.shape[:2] == (h, w):
        return labels
    return cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)


def _scale_landmarks(
    landmarks: np.ndarray, src: tuple[int, int], dst: tuple[int, int]
) -> np.ndarray:
    out = np.array(landmarks, dtype=np.float32, copy=True)
    out[..., 0] *= dst[1] / src[1]
    out[..., 1] *= dst[0] / src[0]
    return out


def _augment(
    image: np.ndarray, mask: np.ndarray, cfg: PairConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if not cfg.augment:
        return image, mask
    image = color_jitter(image, rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    params = random_affine_params(rng, cfg.max_translate, cfg.max_scale, cfg.max_rotate)
    warped, warped_mask = apply_affine(image, mask, params, fill=cfg.fill)
    assert warped_mask is not None
    return warped, warped_mask


def sample_drops(cfg: PairConfig, rng: np.random.Generator) -> tuple[bool, bool]:
    """(drop_identity, drop_attribute): both with ``drop_all_prob``, each alone with its own."""
    u = float(rng.random())
    if u < cfg.drop_all_prob:
        return True, True
    u -= cfg.drop_all_prob
    if u < cfg.drop_identity_prob:
        return True, False
    u -= cfg.drop_identity_prob
    if u < cfg.drop_attribute_prob:
        return False, True
    return False, False


def make_example(
    clip: Clip,
    cfg: PairConfig,
    rng: np.random.Generator,
    expander: MaskExpander | None = None,
    key: str = "",
) -> dict[str, Any]:
    """One training example (numpy: uint8 images H×W×3, bool masks H×W) from ``clip``.
    Raises :class:`NoAttributeError` if no admissible attribute frame shows a category."""
    allowed = set(cfg.categories)

    def present(t: int) -> list[str]:
        return [c for c in categories_present(clip.parsing[t], cfg.min_fraction) if c in allowed]

    classes = sorted(set().union(*(ATTRIBUTE_CLASSES[c] for c in allowed)))
    if not np.isin(clip.parsing, classes).any():  # fail fast on attribute-free clips
        raise NoAttributeError(f"clip {key or '?'}: no category of {sorted(allowed)} present")
    # The sampled attribute frame may hide the attribute (a hat taken off): try the other
    # admissible frames, then other target windows, before giving the clip up.
    for _ in range(_MAX_WINDOW_TRIES):
        choice = sample_frames(clip.num_frames, cfg.num_frames, cfg.frame_stride, cfg.min_gap, rng)
        attribute_frame, categories = choice.attribute, present(choice.attribute)
        if categories:
            break
        for t in rng.permutation(np.array(choice.candidates)):
            categories = present(int(t))
            if categories:
                attribute_frame = int(t)
                break
        if categories:
            break
    else:
        raise NoAttributeError(f"clip {key or '?'}: no category of {sorted(allowed)} present")
    category = str(rng.choice(categories))

    if cfg.resolution is None:
        raise ValueError("PairConfig.resolution is unset: give it or use PairConfig.at(...)")
    size = cfg.resolution
    src = clip.frames.shape[1:3]
    # Attribute reference: I_attr ⊙ M_attr.
    img_a = _resize_image(clip.frames[attribute_frame], size)
    mask_a = attribute_mask(_resize_labels(clip.parsing[attribute_frame], size), category)
    img_a, mask_a = _augment(img_a, mask_a, cfg, rng)
    # Identity reference: I_port ⊙ (1 − M_port), M_port = own region ∪ expansion.
    img_p = _resize_image(clip.frames[choice.identity], size)
    mask_p = attribute_mask(_resize_labels(clip.parsing[choice.identity], size), category)
    if expander is not None and rng.random() < cfg.expansion_prob:
        try:
            identity = identity_of(clip.meta)
        except KeyError:
            identity = None
        lms = _scale_landmarks(clip.landmarks[choice.identity], src, size)
        mask_p = expander(mask_p, img_p, lms, category, identity, rng) | mask_p
    img_p, mask_p = _augment(img_p, mask_p, cfg, rng)

    targets = np.stack([_resize_image(clip.frames[t], size) for t in choice.target])
    target_lms = _scale_landmarks(clip.landmarks[list(choice.target)], src, size)
    keypoints = render_keypoint_sequence(target_lms, size, cfg.keypoint_thickness)
    drop_identity, drop_attribute = sample_drops(cfg, rng)
    if not cfg.mask_references:
        mask_p, mask_a = np.zeros_like(mask_p), np.ones_like(mask_a)
    return {
        "target": targets,
        "identity_ref": identity_reference(img_p, mask_p),
        "identity_mask": mask_p,
        "attribute_ref": attribute_reference(img_a, mask_a),
        "attribute_mask": mask_a,
        "keypoints": keypoints,
        "drop_identity": drop_identity,
        "drop_attribute": drop_attribute,
        "category": category,
        "key": key,
        "frames": {
            "target": choice.target,
            "identity": choice.identity,
            "attribute": attribute_frame,
            "gap": choice.gap,
        },
    }


def _image_tensor(images: np.ndarray) -> torch.Tensor:
    """…×H×W×3 uint8 -> …×3×H×W float32 in [-1, 1] (0 maps to exactly -1)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float()
    return t.movedim(-1, -3) / 127.5 - 1.0


def to_torch(example: dict[str, Any]) -> dict[str, Any]:
    """The model's contract (see module docstring) from a :func:`make_example` result."""
    keypoints = torch.from_numpy(np.ascontiguousarray(example["keypoints"])).float() / 255.0
    optional = {
        k: torch.from_numpy(np.asarray(example[k], np.float32)) for k in OPTIONAL_TENSOR_KEYS
        if k in example
    }  # fmt: skip
    return optional | {
        "target": _image_tensor(example["target"]),
        "identity_ref": _image_tensor(example["identity_ref"]),
        "identity_mask": torch.from_numpy(example["identity_mask"].astype(np.float32))[None],
        "attribute_ref": _image_tensor(example["attribute_ref"]),
        "attribute_mask": torch.from_numpy(example["attribute_mask"].astype(np.float32))[None],
        "keypoints": keypoints.movedim(-1, -3),
        "drop_identity": torch.tensor(bool(example["drop_identity"])),
        "drop_attribute": torch.tensor(bool(example["drop_attribute"])),
        "category": example["category"],
        "key": example["key"],
    }


def collate_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack :func:`to_torch` examples: tensors along a new batch axis, strings into lists."""
    keys = TENSOR_KEYS + tuple(k for k in OPTIONAL_TENSOR_KEYS if k in examples[0])
    batch: dict[str, Any] = {k: torch.stack([e[k] for e in examples]) for k in keys}
    for k in LIST_KEYS:
        batch[k] = [e[k] for e in examples]
    return batch
