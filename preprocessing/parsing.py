"""Face parsing: label maps (T, H, W) uint8 in the label schema of ``preprocessing.labels``.

Two parsers plug in behind one protocol:
  * ``landmarks`` (default, works offline): polygons from the 478 mediapipe landmarks for the
    face parts, mediapipe's selfie segmentation for person vs background, and colour models
    (hair sampled above the forehead, skin sampled on the cheeks) for hair, ears, neck and
    clothes. It cannot see glasses, hats, earrings, necklaces or beards (hats come out as hair).
  * ``bisenet``: any trained 19-class CelebAMask-HQ parser exported to TorchScript, loaded from
    a local weights file. No such weights can be downloaded offline, so it needs ``weights``.

Left/right follow the subject (mediapipe's convention): ``l_eye`` is the subject's left eye,
which appears on the image's right in a frontal portrait.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from preprocessing.labels import CLASS, LABELS
from preprocessing.mp_models import (
    MODELS,
    close_model,
    create_model,
    inference_logs_silenced,
    model_path,
)

CELEBAMASK_CLASSES: list[str] = list(LABELS[:19])


@runtime_checkable
class FaceParser(Protocol):
    name: str
    version: str
    # Label names the output ids refer to (index = id), recorded in shard metadata.
    classes: list[str]

    def parse(self, frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """frames (T,H,W,3) uint8 crops, landmarks (T,478,3) in crop pixels -> (T,H,W) uint8."""
        ...


# --- landmark index sets, derived once from mediapipe's connection lists -----------------


def _chains(connections: Sequence) -> list[list[int]]:
    """Split a connection list into the paths it lists in order (a new path where it jumps)."""
    chains: list[list[int]] = []
    for c in connections:
        if chains and chains[-1][-1] == c.start:
            chains[-1].append(c.end)
        else:
            chains.append([c.start, c.end])
    return chains


def _ring(a: list[int], b: list[int]) -> list[int]:
    """A closed polygon from two paths running the same way (start to end)."""
    return a + b[::-1]


def _polygons() -> dict[str, list[int]]:
    from mediapipe.tasks.python.vision import FaceLandmarksConnections as C

    lips = _chains(C.FACE_LANDMARKS_LIPS)
    # mediapipe lists lips as outer lower, outer upper, inner lower, inner upper (61->291 and
    # 78->308); 0/17 are the outer top/bottom, 13/14 the inner ones — pick paths by those.
    outer_up = next(p for p in lips if 0 in p)
    outer_lo = next(p for p in lips if 17 in p)
    inner_up = next(p for p in lips if 13 in p)
    inner_lo = next(p for p in lips if 14 in p)
    oval = _chains(C.FACE_LANDMARKS_FACE_OVAL)
    if len(oval) != 1 or oval[0][0] != oval[0][-1]:
        raise RuntimeError("unexpected FACE_OVAL connections in this mediapipe version")
    return {
        "oval": oval[0][:-1],
        "l_brow": _ring(*_chains(C.FACE_LANDMARKS_LEFT_EYEBROW)),
        "r_brow": _ring(*_chains(C.FACE_LANDMARKS_RIGHT_EYEBROW)),
        "l_eye": _ring(*_chains(C.FACE_LANDMARKS_LEFT_EYE)),
        "r_eye": _ring(*_chains(C.FACE_LANDMARKS_RIGHT_EYE)),
        # The nose connections are a skeleton, not an outline: its hull is the region.
        "nose": sorted({i for c in C.FACE_LANDMARKS_NOSE for i in (c.start, c.end)}),
        "u_lip": _ring(outer_up, inner_up),
        "l_lip": _ring(outer_lo, inner_lo),
        "mouth": _ring(inner_up, inner_lo),
    }


def _fill(shape: tuple[int, int], points: np.ndarray, hull: bool = False) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    # 4 fractional bits: sub-pixel polygon vertices; -0.5 maps continuous to index coords.
    pts = np.round((points[:, :2] - 0.5) * 16).astype(np.int32)
    if hull:
        pts = cv2.convexHull(pts)
    cv2.fillPoly(mask, [pts.reshape(-1, 1, 2)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


class _ColourModel:
    """Diagonal Gaussian in Lab; lightness down-weighted (shading varies more than hue)."""

    def __init__(self, samples: np.ndarray) -> None:
        self.mean = samples.mean(axis=0)
        # Floors keep a flat-coloured sample (e.g. a synthetic image) from giving a zero spread.
        self.std = np.maximum(samples.std(axis=0), np.array([6.0, 3.0, 3.0]))
        self.weight = np.array([0.5, 1.0, 1.0])

    def distance(self, lab: np.ndarray) -> np.ndarray:
        z = (lab - self.mean) / self.std * self.weight
        return np.sqrt((z**2).sum(axis=-1))


class LandmarkParser:
    """Offline face parser from landmarks + selfie segmentation + colour (see module doc)."""

    name = "landmarks"
    version = "1"
    classes = CELEBAMASK_CLASSES
    # What it can actually output; glasses/hat/earrings/necklace/beard it cannot see.
    detects = frozenset(
        {"background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear", "nose",
         "mouth", "u_lip", "l_lip", "neck", "cloth", "hair"}
    )  # fmt: skip

    def __init__(
        self, model: str | os.PathLike | None = None, person_threshold: float = 0.5
    ) -> None:
        self.model = str(model) if model is not None else None
        if self.model is None:
            self.model = str(model_path("selfie_segmentation.tflite"))
        self.person_threshold = person_threshold
        self.polygons = _polygons()
        self._segmenter = None
        self._pid: int | None = None
        self.version = f"1+selfie-{MODELS['selfie_segmentation.tflite'].sha256[:8]}"

    def __reduce__(self):  # send settings, never live mediapipe state (fork/spawn/Ray safe)
        return (LandmarkParser, (self.model, self.person_threshold))

    def close(self) -> None:
        if self._segmenter is not None:
            close_model(self._segmenter)
            self._segmenter = None

    def __enter__(self) -> LandmarkParser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def person_mask(self, frame: np.ndarray) -> np.ndarray:
        """Person confidence (H, W) float32 in [0, 1] from the selfie segmentation model."""
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        if self._segmenter is None or self._pid != os.getpid():
            options = vision.ImageSegmenterOptions(
                base_options=BaseOptions(model_asset_path=self.model),
                output_confidence_masks=True,
            )
            self._segmenter = create_model(
                lambda: vision.ImageSegmenter.create_from_options(options)
            )
            self._pid = os.getpid()
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))
        with inference_logs_silenced():
            result = self._segmenter.segment(image)
        return np.array(result.confidence_masks[0].numpy_view()).reshape(frame.shape[:2])

    def parse(self, frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        landmarks = np.asarray(landmarks, np.float32)
        if frames.ndim != 4 or frames.dtype != np.uint8 or landmarks.shape[0] != len(frames):
            raise ValueError(
                f"need frames (T,H,W,3) uint8 and landmarks (T,478,3), got {frames.shape} "
                f"{frames.dtype} and {landmarks.shape}"
            )
        return np.stack([self.parse_frame(f, lm) for f, lm in zip(frames, landmarks, strict=True)])

    def parse_frame(self, frame: np.ndarray, lms: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        shape = (h, w)
        poly = {k: _fill(shape, lms[idx], hull=(k == "nose")) for k, idx in self.polygons.items()}
        oval = poly["oval"]
        person = (self.person_mask(frame) > self.person_threshold) | oval
        lab = cv2.cvtColor(frame.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)

        # Face-aligned coordinates: U along the eye line, V down the face, both normalised so
        # the face oval spans [-1, 1]; this keeps the regions right under head roll.
        eye_r = lms[self.polygons["r_eye"], :2].mean(0)
        eye_l = lms[self.polygons["l_eye"], :2].mean(0)
        eu = (eye_l - eye_r) / max(float(np.linalg.norm(eye_l - eye_r)), 1e-6)
        ev = np.array([-eu[1], eu[0]])
        ov = lms[self.polygons["oval"], :2]
        ou, ovv = ov @ eu, ov @ ev
        uc, vc = (ou.min() + ou.max()) / 2, (ovv.min() + ovv.max()) / 2
        a, b = max((ou.max() - ou.min()) / 2, 1.0), max((ovv.max() - ovv.min()) / 2, 1.0)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        U = (xs * eu[0] + ys * eu[1] - uc) / a
        V = (xs * ev[0] + ys * ev[1] - vc) / b

        features = np.zeros(shape, bool)
        for k in ("l_brow", "r_brow", "l_eye", "r_eye", "nose", "u_lip", "l_lip", "mouth"):
            features |= poly[k]
        cheeks = oval & ~features & (V > -0.3) & (V < 0.5)
        skin_model = _ColourModel(lab[cheeks]) if cheeks.sum() >= 20 else None
        above = person & ~oval & (V > -1.35) & (V < -1.02) & (np.abs(U) < 0.5)
        hair_model = _ColourModel(lab[above]) if above.sum() >= 20 else None

        inf = np.full(shape, np.inf, np.float32)
        d_skin = skin_model.distance(lab) if skin_model else inf
        d_hair = hair_model.distance(lab) if hair_model else inf
        skin_like = (d_skin < 3.0) & (d_skin <= d_hair)
        hair_like = (d_hair < 3.0) & (d_hair < d_skin)

        labels = np.zeros(shape, np.uint8)
        labels[person] = CLASS["cloth"]  # the default for the person; refined below
        # Head region: the person above mouth level, beside and above the face (shoulders sit
        # lower in a portrait crop). Skin-coloured parts joined to the face are ears (beside
        # the eyes/nose) or skin (a bald forehead); everything else is hair — a hat or scarf
        # too, which this parser cannot tell apart.
        around = person & ~oval & (V < 0.55) & (np.abs(U) < 2.2)
        ear_band = (np.abs(U) > 0.8) & (np.abs(U) < 1.5) & (V > -0.45) & (V < 0.45)
        n, comp = cv2.connectedComponents(((around & skin_like) | oval).astype(np.uint8), 8)
        face_comps = np.zeros(n, bool)
        face_comps[np.unique(comp[oval])] = True
        face_comps[0] = False
        skin_near = around & skin_like & face_comps[comp]
        labels[around & ~skin_near] = CLASS["hair"]
        labels[skin_near] = CLASS["skin"]
        labels[skin_near & ear_band & (U > 0)] = CLASS["l_ear"]
        labels[skin_near & ear_band & (U < 0)] = CLASS["r_ear"]
        # Below the face: neck where skin-coloured under the chin; long hair where it has the
        # hair colour and joins the hair above (checked by connected components).
        below = person & ~oval & ~around
        labels[below & skin_like & (np.abs(U) < 0.9) & (V < 2.5)] = CLASS["neck"]
        hair = labels == CLASS["hair"]
        if hair_model is not None:
            candidates = (hair | (below & hair_like & (np.abs(U) < 2.0))).astype(np.uint8)
            n, comp = cv2.connectedComponents(candidates, connectivity=8)
            keep = np.zeros(n, bool)
            keep[np.unique(comp[hair])] = True
            keep[0] = False
            long_hair = keep[comp] & below
            labels[long_hair] = CLASS["hair"]
        # The face: skin inside the oval, except fringe/bangs over the forehead, then the parts.
        labels[oval] = CLASS["skin"]
        labels[oval & hair_like & ~skin_like & (V < -0.45) & ~features] = CLASS["hair"]
        for k in ("nose", "l_brow", "r_brow", "l_eye", "r_eye", "u_lip", "l_lip", "mouth"):
            labels[poly[k]] = CLASS[k]
        return _clean_hair(labels, person & ~oval)


def _clean_hair(labels: np.ndarray, editable: np.ndarray) -> np.ndarray:
    """Close small holes in the hair and drop hair specks (both colour noise).

    Holes become hair only where ``editable`` (person, outside the face polygons); specks
    become the most common other label around them.
    """
    hair = (labels == CLASS["hair"]).astype(np.uint8)
    closed = cv2.morphologyEx(hair, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    labels = np.where((closed > 0) & editable, CLASS["hair"], labels).astype(np.uint8)
    hair = (labels == CLASS["hair"]).astype(np.uint8)
    opened = cv2.morphologyEx(hair, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    specks = (hair > 0) & (opened == 0)
    if specks.any():
        # Fill each speck with the most common non-hair label of its 5x5 neighbourhood.
        not_hair = np.where(hair > 0, 255, labels).astype(np.uint8)
        best = np.zeros(labels.shape, np.int32)
        best_label = labels.copy()
        for lab in np.unique(not_hair[not_hair != 255]):
            count = cv2.boxFilter((not_hair == lab).astype(np.float32), -1, (5, 5), normalize=False)
            better = count > best
            best = np.where(better, count, best)
            best_label = np.where(better, lab, best_label)
        labels = np.where(specks, best_label, labels).astype(np.uint8)
    return labels


# --- trained parser plug-in ----------------------------------------------------------------


class TorchScriptParser:
    """A trained parser exported from PyTorch (e.g. a CelebAMask-HQ BiSeNet).

    Loads ``weights`` as a ``torch.export`` program (``.pt2``, ``torch.export.load``) or else
    as TorchScript (``torch.jit.load``; deprecated upstream but how most BiSeNet ports export),
    so no model class has to be importable here. The module takes (N, 3, S, S) float32 RGB,
    normalised with ImageNet mean/std, and returns logits (N, C, S', S') (or a tuple/list whose
    first element is that, as BiSeNet does). ``class_map`` maps its C output ids to the label
    schema (default: identity, i.e. the 19 CelebAMask-HQ classes in BiSeNet order). Landmarks
    are not used. Frames go in batches of ``batch_size`` (the last one padded), so an export
    with a fixed batch dimension works when ``batch_size`` matches it. ``version`` is the
    weights' sha256 prefix, so shards record what ran.
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        name: str = "bisenet",
        input_size: int = 512,
        class_map: Sequence[int] | None = None,
        batch_size: int = 8,
    ) -> None:
        import torch

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"parser weights {path} not found")
        self.name = name
        self.version = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.classes = CELEBAMASK_CLASSES
        self.input_size = input_size
        self.batch_size = batch_size
        self.class_map = None if class_map is None else np.asarray(class_map, np.uint8)
        if path.suffix == ".pt2":
            self._module = torch.export.load(str(path)).module()
        else:
            self._module = torch.jit.load(str(path), map_location="cpu").eval()

    def parse(self, frames: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        import torch

        frames = np.asarray(frames)
        t, h, w, _ = frames.shape
        s = self.input_size
        mean = np.array([0.485, 0.456, 0.406], np.float32)
        std = np.array([0.229, 0.224, 0.225], np.float32)
        out = np.empty((t, h, w), np.uint8)
        for start in range(0, t, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            x = np.stack([cv2.resize(f, (s, s), interpolation=cv2.INTER_LINEAR) for f in chunk])
            x = ((x.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
            n = len(x)
            # Pad the last chunk to a full batch: exports with a fixed batch size still run.
            x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, 0)])
            with torch.inference_mode():
                y = self._module(torch.from_numpy(np.ascontiguousarray(x)))
            if isinstance(y, tuple | list):
                y = y[0]
            ids = y[:n].argmax(dim=1).to(torch.uint8).numpy()
            for k, m in enumerate(ids):
                out[start + k] = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
        return self.class_map[out] if self.class_map is not None else out


def load_parser(name: str, weights: str | os.PathLike | None = None) -> FaceParser:
    """``landmarks`` -> LandmarkParser; ``bisenet`` -> TorchScriptParser(weights)."""
    if name == "landmarks":
        return LandmarkParser()
    if name == "bisenet":
        if weights is None:
            raise FileNotFoundError(
                "parser 'bisenet' needs a local weights file (weights=...): a torch.export "
                ".pt2 or TorchScript file of a 19-class CelebAMask-HQ BiSeNet (input "
                "N×3×512×512 ImageNet-normalised, output logits N×19×H×W); none can be "
                "downloaded offline — use parser 'landmarks' instead"
            )
        return TorchScriptParser(weights, name="bisenet")
    raise ValueError(f"unknown face parser {name!r} (known: landmarks, bisenet)")


def summarize_agreement(per_clip: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Per-class IoU of many clips (:func:`parser_agreement` results) → ``{"clips": n,
    "iou": {class: mean over the clips that show it}, "miou": mean of those}``."""
    classes = sorted({c for row in per_clip for c in row}, key=lambda c: CLASS[c])
    iou = {}
    for c in classes:
        values = [row[c] for row in per_clip if c in row and np.isfinite(row[c])]
        if values:
            iou[c] = float(np.mean(values))
    miou = float(np.mean(list(iou.values()))) if iou else float("nan")
    return {"clips": len(per_clip), "iou": iou, "miou": miou}


def parser_agreement(
    pred: np.ndarray, truth: np.ndarray, classes: Sequence[str] | None = None
) -> dict[str, float]:
    """Per-class IoU between two label maps (any shape, same shape).

    ``classes``: label names to score (default: every class present in either map). A class
    absent from both maps scores NaN (nothing to agree on), so callers can nanmean.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {truth.shape}")
    if classes is None:
        present = np.union1d(np.unique(pred), np.unique(truth))
        classes = [LABELS[i] for i in present if i < len(LABELS)]
    out = {}
    for name in classes:
        k = CLASS[name]
        p, t = pred == k, truth == k
        union = np.logical_or(p, t).sum()
        out[name] = float(np.logical_and(p, t).sum() / union) if union else float("nan")
    return out
