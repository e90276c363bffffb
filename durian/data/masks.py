"""Complementary masks and mask expansion (method note §2 and §3).

The attribute reference keeps ``M_attr`` (``Ĩ_attr = I_attr ⊙ M_attr``); the identity reference
keeps the complement of the candidate transfer region (``Ĩ_port = I_port ⊙ (1 − M_port)``).
``M_port`` is the portrait's own attribute region unioned with an *expansion*, so that the removed
region also covers attributes larger or shaped differently than the subject's own. The offline
default expander is a mask bank: same-category masks of *other identities*, moved onto this frame
by a landmark similarity transform. Everything here is pure numpy (+ cv2 for warps) and is shared
by training, evaluation and inference.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

from preprocessing.labels import ATTRIBUTE_CLASSES, CATEGORIES, check_category
from durian.data.clip_codec import Clip

# Landmarks that move rigidly with the head (eye corners, brow ends, nose bridge/tip, mouth
# corners, chin, forehead, cheeks) — a similarity fitted on them is not thrown off by blinks or
# speech, which deform the lids and lips.
STABLE_LANDMARKS: tuple[int, ...] = (
    33, 133, 362, 263,  # eye corners
    70, 105, 336, 300,  # brows
    168, 6, 1, 4,  # nose bridge and tip
    61, 291,  # mouth corners
    152, 10,  # chin, forehead
    234, 454,  # cheeks at the face oval
)  # fmt: skip


# --------------------------------------------------------------------------- basic masks


def attribute_mask(labels: np.ndarray, category: str) -> np.ndarray:
    """``M_attr``: the pixels of ``labels`` (…×H×W class ids) that belong to ``category``."""
    classes = sorted(ATTRIBUTE_CLASSES[check_category(category)])
    return np.isin(labels, classes)


def identity_mask(
    labels: np.ndarray, category: str, expansion: np.ndarray | None = None
) -> np.ndarray:
    """``M_port``: the portrait's own ``category`` region, unioned with ``expansion`` if given."""
    mask = attribute_mask(labels, category)
    if expansion is not None:
        mask = mask | expansion.astype(bool)
    return mask


def apply_mask(image: np.ndarray, mask: np.ndarray, fill: int | float = 0) -> np.ndarray:
    """``image ⊙ mask``: pixels outside ``mask`` are set to ``fill`` (black by default)."""
    keep = mask.astype(bool)
    out = np.full_like(image, fill)
    out[keep] = image[keep]
    return out


def attribute_reference(image: np.ndarray, attr_mask: np.ndarray) -> np.ndarray:
    """``Ĩ_attr = I_attr ⊙ M_attr``: only the attribute stays visible."""
    return apply_mask(image, attr_mask)


def identity_reference(image: np.ndarray, port_mask: np.ndarray) -> np.ndarray:
    """``Ĩ_port = I_port ⊙ (1 − M_port)``: the candidate transfer region is removed."""
    return apply_mask(image, ~port_mask.astype(bool))


def category_fractions(labels: np.ndarray) -> dict[str, float]:
    """Fraction of pixels of each attribute category in a label map (any leading shape)."""
    counts = np.bincount(labels.reshape(-1), minlength=256)
    total = max(int(labels.size), 1)
    return {c: float(sum(counts[k] for k in ATTRIBUTE_CLASSES[c])) / total for c in CATEGORIES}


def categories_present(labels: np.ndarray, min_fraction: float = 0.005) -> list[str]:
    """Categories (in ``CATEGORIES`` order) covering at least ``min_fraction`` of ``labels``."""
    fractions = category_fractions(labels)
    return [c for c in CATEGORIES if fractions[c] > 0 and fractions[c] >= min_fraction]


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean mask by a disc of ``radius`` pixels (no-op for radius ≤ 0)."""
    if radius <= 0:
        return mask.astype(bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


# --------------------------------------------------------------------------- alignment


def similarity_from_landmarks(
    src: np.ndarray, dst: np.ndarray, indices: Sequence[int] | None = STABLE_LANDMARKS
) -> np.ndarray:
    """2×3 least-squares similarity (rotation, uniform scale, translation) taking ``src`` to
    ``dst`` landmarks (Umeyama, via scikit-image). Deterministic, unlike OpenCV's RANSAC
    estimators."""
    s = np.asarray(src, dtype=np.float64)[:, :2]
    d = np.asarray(dst, dtype=np.float64)[:, :2]
    if indices is not None and len(s) > max(indices):
        s, d = s[list(indices)], d[list(indices)]
    fit = SimilarityTransform.from_estimate(s, d)
    if not fit:  # a FailedEstimation: all source points coincide (or are otherwise degenerate)
        raise ValueError(f"degenerate source landmarks: {fit}")
    return fit.params[:2].copy()


def align_mask(
    mask: np.ndarray,
    src_landmarks: np.ndarray,
    dst_landmarks: np.ndarray,
    out_shape: tuple[int, int],
) -> np.ndarray:
    """Move ``mask`` (drawn on the face with ``src_landmarks``) onto the face with
    ``dst_landmarks``, as an ``out_shape`` (H, W) boolean mask. Nearest-neighbour: masks stay
    binary. Inference uses this to bring attribute masks into portrait coordinates."""
    matrix = similarity_from_landmarks(src_landmarks, dst_landmarks)
    h, w = out_shape
    warped = cv2.warpAffine(
        mask.astype(np.uint8),
        matrix,
        (w, h),
        flags=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return warped.astype(bool)


# --------------------------------------------------------------------------- mask bank


def identity_of(meta: dict[str, Any]) -> str:
    """The identity id of a clip from its metadata (falls back to the source video)."""
    for name in ("identity", "identity_id", "video_id", "source", "source_video"):
        value = meta.get(name)
        if value not in (None, ""):
            return str(value)
    raise KeyError("clip metadata names no identity (expected 'identity' or 'video_id')")


@dataclass
class BankEntries:
    """The masks of one category: N masks of size S×S with their frame's landmarks."""

    masks: np.ndarray  # (N, S, S) bool
    landmarks: np.ndarray  # (N, 478, 2) float32, in mask pixel coordinates
    identities: np.ndarray  # (N,) str

    def __len__(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class MaskBank:
    """Attribute masks per category, each stored with the landmarks of its frame and the
    identity it came from, so an expansion can exclude the portrait's own identity."""

    size: int
    entries: dict[str, BankEntries] = field(default_factory=dict)

    def get(self, category: str) -> BankEntries:
        check_category(category)
        empty = BankEntries(
            np.zeros((0, self.size, self.size), bool),
            np.zeros((0, 478, 2), np.float32),
            np.zeros((0,), str),
        )
        return self.entries.get(category, empty)

    def candidates(self, category: str, identity: str | None) -> np.ndarray:
        """Indices of ``category`` masks that come from identities other than ``identity``."""
        entries = self.get(category)
        if identity is None:
            return np.arange(len(entries))
        return np.flatnonzero(entries.identities != str(identity))

    def counts(self) -> dict[str, int]:
        return {c: len(self.get(c)) for c in CATEGORIES}

    def save(self, path: str | Path) -> None:
        """One lossless ``.npz`` (masks bit-packed); written atomically via a temp file."""
        arrays: dict[str, np.ndarray] = {"size": np.array(self.size, np.int64)}
        for cat, e in self.entries.items():
            arrays[f"{cat}__masks"] = np.packbits(e.masks.astype(bool), axis=-1)
            arrays[f"{cat}__count"] = np.array(len(e), np.int64)
            arrays[f"{cat}__landmarks"] = e.landmarks.astype(np.float32)
            arrays[f"{cat}__identities"] = e.identities.astype(str)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> MaskBank:
        with np.load(Path(path), allow_pickle=False) as z:
            size = int(z["size"])
            entries = {}
            for cat in CATEGORIES:
                if f"{cat}__masks" not in z.files:
                    continue
                masks = np.unpackbits(z[f"{cat}__masks"], axis=-1, count=size).astype(bool)
                entries[cat] = BankEntries(
                    masks, z[f"{cat}__landmarks"], z[f"{cat}__identities"].astype(str)
                )
        return cls(size=size, entries=entries)


def build_mask_bank(
    clips: Iterable[Clip],
    per_category_limit: int,
    rng: np.random.Generator,
    *,
    size: int = 128,
    frames_per_clip: int = 1,
    min_fraction: float = 0.005,
    categories: Sequence[str] = CATEGORIES,
) -> MaskBank:
    """A mask bank from ``clips``: for each category, a uniform sample (reservoir) of at most
    ``per_category_limit`` masks, ``frames_per_clip`` random frames per clip, resized to
    ``size``×``size`` with their landmarks scaled alike."""
    for c in categories:
        check_category(c)
    reservoirs: dict[str, list[tuple[np.ndarray, np.ndarray, str]]] = {c: [] for c in categories}
    seen = dict.fromkeys(categories, 0)
    for clip in clips:
        identity = identity_of(clip.meta)
        n = min(frames_per_clip, clip.num_frames)
        for t in np.sort(rng.choice(clip.num_frames, size=n, replace=False)):
            if not np.isfinite(clip.landmarks[t, :, :2]).all():
                continue  # no face found in this frame: the mask could never be aligned
            labels = clip.parsing[t]
            h, w = labels.shape
            for cat in categories_present(labels, min_fraction):
                if cat not in reservoirs:
                    continue
                seen[cat] += 1
                slot = len(reservoirs[cat])
                if slot >= per_category_limit:
                    # Reservoir sampling: item k survives with probability limit / k.
                    slot = int(rng.integers(seen[cat]))
                    if slot >= per_category_limit:
                        continue
                mask = cv2.resize(
                    attribute_mask(labels, cat).astype(np.uint8),
                    (size, size),
                    interpolation=cv2.INTER_NEAREST,
                ).astype(bool)
                lms = clip.landmarks[t, :, :2] * np.array([size / w, size / h], np.float32)
                item = (mask, lms.astype(np.float32), identity)
                if slot == len(reservoirs[cat]):
                    reservoirs[cat].append(item)
                else:
                    reservoirs[cat][slot] = item
    entries = {}
    for cat, items in reservoirs.items():
        if not items:
            continue
        entries[cat] = BankEntries(
            np.stack([m for m, _, _ in items]),
            np.stack([lm for _, lm, _ in items]),
            np.array([i for _, _, i in items], dtype=str),
        )
    return MaskBank(size=size, entries=entries)


# --------------------------------------------------------------------------- expansion


@runtime_checkable
class MaskExpander(Protocol):
    """Returns an expanded ``M_port`` (⊇ ``own_mask``) for one identity frame. The mask bank is
    the offline default; a generative expander (SDXL + ControlNet, then segmentation) can use
    ``image`` and ``landmarks`` to synthesise larger attributes of the same pose."""

    def __call__(
        self,
        own_mask: np.ndarray,
        image: np.ndarray,
        landmarks: np.ndarray,
        category: str,
        identity: str | None,
        rng: np.random.Generator,
    ) -> np.ndarray: ...


def random_dilation_radius(
    rng: np.random.Generator, shape: tuple[int, int], dilation_range: tuple[float, float]
) -> int:
    """A dilation radius in pixels drawn from ``dilation_range`` (fractions of the image side)."""
    lo, hi = dilation_range
    frac = float(rng.uniform(lo, hi)) if hi > lo else float(lo)
    return int(round(frac * max(shape)))


def expand_mask(
    own_mask: np.ndarray,
    own_landmarks: np.ndarray,
    bank: MaskBank | None,
    category: str,
    identity: str | None,
    rng: np.random.Generator,
    n_union: int = 1,
    dilation_range: tuple[float, float] = (0.0, 0.03),
) -> np.ndarray:
    """``M_port = M_own ∪ ⋃ align(M_bank_k)`` dilated by a random radius: ``n_union`` masks of
    ``category`` from identities other than ``identity``, aligned to this frame's landmarks.
    With no bank (or no candidates) only the dilation applies. The result always ⊇ own mask."""
    check_category(category)
    own = own_mask.astype(bool)
    out = own.copy()
    aligned = np.isfinite(np.asarray(own_landmarks)[:, :2]).all()
    if bank is not None and n_union > 0 and aligned:
        candidates = bank.candidates(category, identity)
        if len(candidates):
            entries = bank.get(category)
            k = min(n_union, len(candidates))
            for idx in rng.choice(candidates, size=k, replace=False):
                out |= align_mask(
                    entries.masks[idx], entries.landmarks[idx], own_landmarks, own.shape
                )
    out = dilate_mask(out, random_dilation_radius(rng, own.shape, dilation_range))
    return out | own


@dataclass
class BankExpander:
    """The offline default :class:`MaskExpander`: :func:`expand_mask` over a :class:`MaskBank`."""

    bank: MaskBank | None
    n_union: int = 1
    dilation_range: tuple[float, float] = (0.0, 0.03)

    def __call__(
        self,
        own_mask: np.ndarray,
        image: np.ndarray,
        landmarks: np.ndarray,
        category: str,
        identity: str | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        return expand_mask(
            own_mask,
            landmarks,
            self.bank,
            category,
            identity,
            rng,
            n_union=self.n_union,
            dilation_range=self.dilation_range,
        )
