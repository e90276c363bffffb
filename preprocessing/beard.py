"""The beard class (19) for face parsers that have none.

CelebAMask-HQ has no beard class, so no published face parser outputs one: a beard comes out as
skin (mostly) or hair. The method transfers beards, so every parser here adds class 19 the same
way, from the face's lower half:

* where: inside the jaw region given by the landmarks — the face oval below the nose (rising
  towards the sideburns at the sides of the face), plus a band around the jaw and chin for the
  beard's volume — on pixels the parser gave to skin, hair, neck, cloth or background (never the
  lips, mouth, nose, eyes, brows, glasses, ears or hat);
* what: a seed on the face itself — pixels whose colour is not skin-coloured (a robust Lab
  model of the skin the parser sees on the upper cheeks, where no beard grows and glasses do
  not reach)
  and is hair-coloured (darker, greyer or less red than that skin, as black, brown, grey, white
  and blond hair are, or like the subject's own hair where the parser sees some), specks
  dropped, and not along the jaw line (where the face's own shadow falls); a seed under 1% of
  the jaw region on the face is no beard;
* then grown with the beard's own colour (learned on the seed) over the rest of the jaw region,
  gaps closed, keeping only regions that grew from enough seed (a neck shadow or a collar next
  to the chin is not beard-coloured, and not connected to a seed).

Everything is in face-aligned coordinates (U along the eye line, V down the face, the oval
spanning [-1, 1]), so head roll does not change the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from preprocessing.labels import CLASS

BEARD = CLASS["beard"]
# Labels a beard hides under in a map without a beard class.
COVERED = np.array([CLASS[c] for c in ("background", "skin", "neck", "cloth", "hair")])
SKIN_THRESHOLD = 3.0  # robust z-distance in Lab beyond which a pixel is "not skin"
MIN_JAW_FRACTION = 0.01  # a beard covers at least this much of the jaw region on the face
SEEDED_FRACTION = 0.25  # a beard region grew from at least this much beard on the face
JAW_BAND = 0.2  # the jaw region reaches this far beyond the face oval (relative to its size)
CHIN_EDGE = 0.85  # V above which (towards the jaw line) no seed is taken


@lru_cache(maxsize=1)
def _landmark_sets() -> dict[str, list[int]]:
    """Landmark indices of the face oval, eyes, lips and nose, from mediapipe's connection
    lists (unordered: the regions here are convex hulls of them)."""
    from mediapipe.tasks.python.vision import FaceLandmarksConnections as C

    def points(connections) -> list[int]:
        return sorted({i for c in connections for i in (c.start, c.end)})

    return {
        "oval": points(C.FACE_LANDMARKS_FACE_OVAL),
        "l_eye": points(C.FACE_LANDMARKS_LEFT_EYE),
        "r_eye": points(C.FACE_LANDMARKS_RIGHT_EYE),
        "lips": points(C.FACE_LANDMARKS_LIPS),
        "nose": points(C.FACE_LANDMARKS_NOSE),
    }


@dataclass
class FaceFrame:
    """Face-aligned pixel coordinates of one frame (see module doc)."""

    u: np.ndarray  # (H, W) along the eye line, -1..1 across the oval
    v: np.ndarray  # (H, W) down the face, -1 (top of the oval) .. 1 (chin)
    half_height: float  # the oval's half height in pixels
    oval: np.ndarray  # (H, W) bool, inside the face oval
    down: np.ndarray  # (2,) unit vector of V in image (x, y)
    v_centre: float  # the oval's centre along ``down``, pixels

    def v_at(self, point: np.ndarray) -> float:
        """V of a point (x, y) in pixels, e.g. a landmark."""
        along = np.asarray(point, np.float64)[:2] @ self.down
        return float((along - self.v_centre) / self.half_height)


def face_frame(landmarks: np.ndarray, shape: tuple[int, int]) -> FaceFrame | None:
    """The face-aligned frame of ``landmarks`` (478, 2+) in an image of ``shape``; None when the
    landmarks do not span a face (all zero, degenerate or not finite)."""
    sets = _landmark_sets()
    lms = np.asarray(landmarks, np.float64)[:, :2]
    if not np.isfinite(lms).all():
        return None
    eye_r, eye_l = lms[sets["r_eye"]].mean(0), lms[sets["l_eye"]].mean(0)
    span = float(np.linalg.norm(eye_l - eye_r))
    if span < 2.0:
        return None
    eu = (eye_l - eye_r) / span
    ev = np.array([-eu[1], eu[0]])
    oval = lms[sets["oval"]]
    ou, ov = oval @ eu, oval @ ev
    a, b = (ou.max() - ou.min()) / 2, (ov.max() - ov.min()) / 2
    if min(a, b) < 4.0:
        return None
    uc, vc = (ou.max() + ou.min()) / 2, (ov.max() + ov.min()) / 2
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return FaceFrame(
        u=((xs * eu[0] + ys * eu[1]) - uc) / a,
        v=((xs * ev[0] + ys * ev[1]) - vc) / b,
        half_height=float(b),
        oval=fill_polygon(shape, oval, hull=True),
        down=ev,
        v_centre=float(vc),
    )


class _RobustColour:
    """Median / MAD model in Lab, lightness down-weighted (shading varies more than colour)."""

    def __init__(self, samples: np.ndarray) -> None:
        samples = samples[:: max(1, len(samples) // 2000)]  # medians of ~2000 are plenty
        self.centre = np.median(samples, axis=0)
        mad = np.median(np.abs(samples - self.centre), axis=0) * 1.4826
        # Floors: a flat-coloured sample (synthetic skin) must not give a zero spread.
        self.spread = np.maximum(mad, np.array([5.0, 2.5, 2.5]))
        self.weight = np.array([0.5, 1.0, 1.0])

    def distance(self, lab: np.ndarray) -> np.ndarray:
        z = (lab - self.centre) / self.spread * self.weight
        return np.sqrt((z**2).sum(axis=-1))


def fill_polygon(shape: tuple[int, int], points: np.ndarray, hull: bool = False) -> np.ndarray:
    """The pixels (H, W) bool inside the polygon (or its convex hull) through ``points``."""
    mask = np.zeros(shape, np.uint8)
    # 4 fractional bits: sub-pixel polygon vertices; -0.5 maps continuous to index coords.
    pts = np.round((points[:, :2] - 0.5) * 16).astype(np.int32)
    if hull:
        pts = cv2.convexHull(pts)
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def jaw_region(landmarks: np.ndarray, frame: FaceFrame) -> np.ndarray:
    """(H, W) bool: where a beard can grow — the oval below the nose base, rising towards the
    sideburns at the sides, and the oval grown by a fifth about its centre below that (the
    beard's volume around the jaw and chin)."""
    lms = np.asarray(landmarks, np.float64)
    v_nose = frame.v_at(lms[2])  # below the nose tip (subnasale)
    top = v_nose - 0.35 * np.clip(np.abs(frame.u) - 0.45, 0.0, 1.0)
    return fill_polygon(frame.oval.shape, _grown_oval(lms), hull=True) & (frame.v > top)


def _grown_oval(landmarks: np.ndarray, grow: float = JAW_BAND) -> np.ndarray:
    """The face oval's points (n, 2) scaled by ``1 + grow`` about its centre."""
    oval = np.asarray(landmarks, np.float64)[_landmark_sets()["oval"], :2]
    centre = (oval.min(0) + oval.max(0)) / 2
    return centre + (oval - centre) * (1.0 + grow)


def beard_mask(frame: np.ndarray, landmarks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the beard in one RGB ``frame`` (H, W, 3) uint8, given its ``landmarks``
    (478, 2+) in frame pixels and a 19-class ``labels`` map (H, W); empty when there is none
    or the frame gives no reference to tell skin from beard."""
    out = np.zeros(labels.shape, bool)
    lms = np.asarray(landmarks, np.float64)
    if lms.ndim != 2 or not np.isfinite(lms[:, :2]).all():
        return out
    # Everything happens in the box around the grown face oval (a fraction of a portrait).
    h, w = labels.shape
    box = _grown_oval(lms)
    x0, y0 = np.clip(np.floor(box.min(0)).astype(int), 0, [w, h])
    x1, y1 = np.clip(np.ceil(box.max(0)).astype(int) + 1, 0, [w, h])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return out
    lms = lms.copy()
    lms[:, :2] -= (x0, y0)
    out[y0:y1, x0:x1] = _beard_in_box(frame[y0:y1, x0:x1], lms, labels[y0:y1, x0:x1])
    return out


def _beard_in_box(frame: np.ndarray, lms: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shape = labels.shape
    none = np.zeros(shape, bool)
    face = face_frame(lms, shape)
    if face is None:
        return none
    sets = _landmark_sets()
    jaw = jaw_region(lms, face)
    # The lips' edges mix lip and skin colours: keep a margin around them.
    margin = max(1, int(round(0.025 * face.half_height)))
    lips = fill_polygon(shape, lms[sets["lips"]], hull=True)
    lips = cv2.dilate(lips.astype(np.uint8), _disk(margin)).astype(bool)
    nose = fill_polygon(shape, lms[sets["nose"]], hull=True)
    candidates = jaw & np.isin(labels, COVERED) & ~lips & ~nose
    on_jaw = candidates & face.oval
    # The skin's colour where no beard grows and glasses do not reach (a parser that cannot see
    # glasses or hats calls them skin): the cheeks between the lenses and the nose base, away
    # from the face's sides; the forehead above the lenses only where the cheeks are too small
    # to sample (a cap's band or a fringe there is as likely as skin).
    v_nose = face.v_at(lms[2])
    v_eye = float(np.mean([face.v_at(lms[sets[e]].mean(0)) for e in ("l_eye", "r_eye")]))
    skin_px = (labels == CLASS["skin"]) & face.oval & (np.abs(face.u) < 0.6)
    upper = skin_px & (face.v > v_eye + 0.3) & (face.v < v_nose + 0.03)
    if upper.sum() < 30:
        upper |= skin_px & (face.v > -0.9) & (face.v < v_eye - 0.33)
    if upper.sum() < 20 or not on_jaw.any():
        return none
    lab = cv2.cvtColor(frame.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    skin = _RobustColour(lab[upper])
    hair_px = (labels == CLASS["hair"]) & ~jaw
    hair = _RobustColour(lab[hair_px]) if hair_px.sum() >= 20 else None

    def seedlike(colours: np.ndarray) -> np.ndarray:
        """Not skin-coloured and hair-coloured: darker, greyer or less red than the skin (as
        black, brown, grey, white and blond hair are), or like the subject's own hair."""
        L, a, b = colours[..., 0], colours[..., 1], colours[..., 2]
        hair_coloured = (
            (L < skin.centre[0] - 8.0)
            | (np.hypot(a, b) < np.hypot(*skin.centre[1:]) - 6.0)
            | (a < skin.centre[1] - 6.0)
        )
        if hair is not None:
            hair_coloured |= hair.distance(colours) < SKIN_THRESHOLD
        return (skin.distance(colours) > SKIN_THRESHOLD) & hair_coloured

    # The seed, on the face itself; most frames (no beard) end here, cheaply.
    seed = np.zeros(shape, np.uint8)
    seed[on_jaw] = seedlike(lab[on_jaw])
    k = max(1, int(round(0.025 * face.half_height)))
    seed = cv2.morphologyEx(seed, cv2.MORPH_OPEN, _disk(k)).astype(bool)  # drop specks
    # Along the jaw line the face is in its own shadow in most photos: seeds lie above it.
    seed &= face.v < CHIN_EDGE
    if seed.sum() < MIN_JAW_FRACTION * on_jaw.sum():
        return none
    # The beard's own colour, learned on the seed, finds its volume beyond the jaw line (and
    # its lighter parts): a neck shadow or a collar next to the chin is not beard-coloured.
    beard_colour = _RobustColour(lab[seed])
    grown = seed.astype(np.uint8)
    grown[candidates] |= (
        (skin.distance(lab[candidates]) > SKIN_THRESHOLD)
        & (beard_colour.distance(lab[candidates]) < SKIN_THRESHOLD)
    ).astype(np.uint8)
    grown = cv2.morphologyEx(grown, cv2.MORPH_CLOSE, _disk(2 * k)).astype(bool) & candidates
    n, comp = cv2.connectedComponents(grown.astype(np.uint8), connectivity=8)
    area = np.bincount(comp.ravel(), minlength=n).astype(np.float64)
    seeded = np.bincount(comp[seed], minlength=n).astype(np.float64)
    # A region is beard where it grew from enough beard on the face itself.
    keep = (seeded >= SEEDED_FRACTION * area) & (seeded >= MIN_JAW_FRACTION * on_jaw.sum() / 2)
    keep[0] = False
    return keep[comp]


def add_beard(frames: np.ndarray, landmarks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``labels`` (T, H, W) uint8 with class 19 (beard) written where :func:`beard_mask` finds
    one in ``frames`` (T, H, W, 3) with ``landmarks`` (T, 478, 2+); a new array."""
    out = np.array(labels, np.uint8, copy=True)
    for t, (frame, lms) in enumerate(zip(frames, landmarks, strict=True)):
        out[t][beard_mask(frame, lms, out[t])] = BEARD
    return out
