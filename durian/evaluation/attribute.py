"""Attribute similarity: does the output's attribute look like the attribute reference's?

Both sides are cut to the bounding box of their attribute mask — the reference with its own
mask, each output frame with the target's (= where the attribute should be) — and compared:

* ``attr_hist_sim``: intersection of the joint RGB colour histograms (``bins``³ bins) of the
  pixels inside the two masks: 1 for the same colour distribution, 0 for disjoint colours.
  Pose-independent, so it works across the pose change between reference and output.
* ``attr_crop_ssim``: SSIM of the two crops resized to ``size``² with the pixels outside each
  mask blacked out, over the union of the resized masks: shape and texture, roughly aligned
  by the boxes.
* ``attr_clip_sim`` (only with a local CLIP vision folder, :class:`ClipImageEncoder`): cosine
  similarity of the CLIP image embeddings of the two masked crops.

An empty mask (no attribute in the reference, or none where the target has it) gives ``nan``:
left out, never scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from durian.evaluation.metrics import ssim


def mask_bbox(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The tight bounding box of a boolean mask as slices, None when the mask is empty."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def color_histogram_similarity(
    a: np.ndarray, mask_a: np.ndarray, b: np.ndarray, mask_b: np.ndarray, bins: int = 8
) -> float:
    """Histogram intersection Σ min(p, q) of the normalised joint RGB histograms of the masked
    pixels: in [0, 1], 1 for identical colour distributions; nan for an empty mask."""
    mask_a, mask_b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    if not mask_a.any() or not mask_b.any():
        return math.nan

    def hist(img: np.ndarray, m: np.ndarray) -> np.ndarray:
        q = (_uint8(img)[m].astype(np.int64) * bins) // 256  # bin per channel
        flat = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
        return np.bincount(flat, minlength=bins**3) / len(flat)

    return float(np.minimum(hist(a, mask_a), hist(b, mask_b)).sum())


def masked_crop(
    image: np.ndarray, mask: np.ndarray, size: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The mask's bounding box of ``image`` with pixels outside the mask set to 0, and the
    cropped mask; resized to size×size when given. None for an empty mask."""
    mask = np.asarray(mask, bool)
    box = mask_bbox(mask)
    if box is None:
        return None
    crop = _uint8(image)[box] * mask[box][..., None]
    m = mask[box]
    if size is not None:
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        m = cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return crop, m


def crop_ssim(
    a: np.ndarray, mask_a: np.ndarray, b: np.ndarray, mask_b: np.ndarray, size: int = 32
) -> float:
    """SSIM of the two masked bounding-box crops at size×size over the union of their masks;
    1 for identical crops; nan for an empty mask."""
    ca, cb = masked_crop(a, mask_a, size), masked_crop(b, mask_b, size)
    if ca is None or cb is None:
        return math.nan
    return ssim(ca[0], cb[0], ca[1] | cb[1])


class ClipImageEncoder:
    """A CLIP vision tower from a local ``save_pretrained`` folder (e.g. the ``image_encoder``
    of sd-image-variations, or a full CLIP model): embeddings of images, compared by cosine."""

    # CLIP's image normalisation (OpenAI's training statistics).
    MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
    STD = np.array([0.26862954, 0.26130258, 0.27577711])

    def __init__(self, folder: str | Path) -> None:
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP folder {folder} not found")
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder)).eval()
        self.size = int(self.model.config.image_size)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N×D embeddings of H×W×3 uint8 images (each resized to the model's input size)."""
        import torch

        batch = np.stack(
            [
                (
                    cv2.resize(_uint8(im), (self.size, self.size), interpolation=cv2.INTER_CUBIC)
                    / 255.0
                    - self.MEAN
                )
                / self.STD
                for im in images
            ]
        ).transpose(0, 3, 1, 2)
        with torch.no_grad():
            out = self.model(pixel_values=torch.from_numpy(batch).float())
        return out.image_embeds.double().numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def attribute_similarity(
    frames: Sequence[np.ndarray],
    frame_masks: Sequence[np.ndarray],
    reference: np.ndarray,
    reference_mask: np.ndarray,
    clip: ClipImageEncoder | None = None,
    bins: int = 8,
    size: int = 32,
) -> dict[str, float]:
    """Mean over frames (those with a non-empty mask) of ``attr_hist_sim`` and
    ``attr_crop_ssim`` (+ ``attr_clip_sim`` with ``clip``); nan where nothing can be compared."""
    hist, struct, crops = [], [], []
    for frame, mask in zip(frames, frame_masks, strict=True):
        hist.append(color_histogram_similarity(frame, mask, reference, reference_mask, bins))
        struct.append(crop_ssim(frame, mask, reference, reference_mask, size))
        crop = masked_crop(frame, mask)
        if crop is not None:
            crops.append(crop[0])

    def mean(values: list[float]) -> float:
        finite = [v for v in values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else math.nan

    out = {"attr_hist_sim": mean(hist), "attr_crop_ssim": mean(struct)}
    if clip is not None:
        ref = masked_crop(reference, reference_mask)
        if ref is None or not crops:
            out["attr_clip_sim"] = math.nan
        else:
            emb = clip.embed([ref[0], *crops])
            out["attr_clip_sim"] = mean([_cosine(emb[0], e) for e in emb[1:]])
    return out
