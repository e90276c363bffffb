"""Face parsing: label maps (T, H, W) uint8 in the label schema of ``preprocessing.labels``.

Parsers plug in behind one protocol (:func:`load_parser`, ``preprocess.parser``):
  * ``landmarks`` (default, works offline): polygons from the 478 mediapipe landmarks for the
    face parts, mediapipe's selfie segmentation for person vs background, and colour models
    (hair sampled above the forehead, skin sampled on the cheeks) for hair, ears, neck and
    clothes. It cannot see glasses, hats, earrings or necklaces (hats come out as hair).
  * ``bisenet``: face-parsing.PyTorch's published state dict ``79999_iter.pth`` (a plain torch
    BiSeNet, :mod:`preprocessing.bisenet`), or any 19-class CelebAMask-HQ parser exported to
    TorchScript / ``torch.export`` (``.pt2``) — told apart by the file's content.
  * ``segformer``: a local Hugging Face SegFormer folder such as ``jonathandinu/face-parsing``
    (:mod:`preprocessing.segformer`), its label order mapped to ours by name.
The trained ones need local weights (none can be downloaded offline). CelebAMask-HQ has no
beard class: every parser adds class 19 (``beard``) from the lower face
(:mod:`preprocessing.beard`) and lists it in ``classes`` (shard metadata).

Left/right follow the subject (mediapipe's convention): ``l_eye`` is the subject's left eye,
which appears on the image's right in a frontal portrait.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from preprocessing.beard import fill_polygon
from preprocessing.labels import ATTRIBUTE_CLASSES, CLASS, LABELS
from preprocessing.mp_models import (
    MODELS,
    close_model,
    create_model,
    inference_logs_silenced,
    model_path,
)
from preprocessing.torch_parser import TorchParser, files_sha256, pick_device

CELEBAMASK_CLASSES: list[str] = list(LABELS[:19])
log = logging.getLogger(__name__)


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


class _ColourModel:
    """Diagonal Gaussian in Lab; lightness down-weighted (shading varies more than hue)."""

    def __init__(self, samples: np.ndarray) -> None:
        self.mean = samples.mean(axis=0)
        # Floors keep a flat-coloured sample (e.g. a synthetic image) from giving a zero spread.
        self.std = np.maximum(samples.std(axis=0), np.array([6.0, 3.0, 3.0]))
        self.weight = np.array([0.5, 1.0, 1.0])

    def distance(self, lab: np.ndarray) -> np.ndarray:
        """Weighted distance (...) float32 of Lab colours (..., 3) to the mean, in stds."""
        # With cv2 (one float32 pass each): numpy's (H, W, 3) temporaries took ten times as
        # long, a quarter of a frame's parse.
        scale = self.weight / self.std
        m = np.hstack([np.diag(scale), (-self.mean * scale)[:, None]]).astype(np.float32)
        z = cv2.transform(np.ascontiguousarray(lab, np.float32).reshape(-1, 1, 3), m)
        sq = cv2.transform(cv2.multiply(z, z), np.ones((1, 3), np.float32))
        return cv2.sqrt(sq).reshape(lab.shape[:-1])


class LandmarkParser:
    """Offline face parser from landmarks + selfie segmentation + colour (see module doc).

    ``segment_every``: the segmentation model (~5.5 ms of a 256x256 frame's ~9.5) runs on
    every n-th frame of a clip and the last (:meth:`person_masks`). 1, the default, keeps the
    labels exact; 2 halves the model's share at a little less agreement with the synthetic
    clips' exact labels (mIoU on 36 clips, issue 22: 0.5446 at 1, 0.5434 at 2, 0.5422 at 3).
    """

    name = "landmarks"
    version = "1"
    classes = CELEBAMASK_CLASSES
    # What it can actually output; glasses/hat/earrings/necklace/beard it cannot see.
    detects = frozenset(
        {"background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "l_ear", "r_ear", "nose",
         "mouth", "u_lip", "l_lip", "neck", "cloth", "hair"}
    )  # fmt: skip

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        person_threshold: float = 0.5,
        segment_every: int = 1,
    ) -> None:
        self.model = str(model) if model is not None else None
        if self.model is None:
            self.model = str(model_path("selfie_segmentation.tflite"))
        self.person_threshold = person_threshold
        if segment_every < 1:
            raise ValueError(f"segment_every must be >= 1, got {segment_every}")
        self.segment_every = segment_every
        self.polygons = _polygons()
        self._segmenter = None
        self._pid: int | None = None
        self._centres: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.version = f"1+selfie-{MODELS['selfie_segmentation.tflite'].sha256[:8]}"
        if segment_every > 1:  # another person mask between keyframes: record what ran
            self.version += f"+every{segment_every}"

    def __reduce__(self):  # send settings, never live mediapipe state (fork/spawn/Ray safe)
        return (LandmarkParser, (self.model, self.person_threshold, self.segment_every))

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

    def person_masks(self, frames: np.ndarray) -> np.ndarray:
        """Person confidence (T, H, W) float32 of a clip's crops: the segmentation model on
        every ``segment_every``-th frame and the last, the frames between them a blend of
        those two masks weighted by time. The model is over half of a frame's parse; in
        crops that follow the face the person moves little from frame to frame (moving the
        masks with the head's similarity transform agreed less with exact labels than
        leaving them in place)."""
        t = len(frames)
        keys = sorted({*range(0, t, self.segment_every), t - 1})
        out = np.empty(frames.shape[:3], np.float32)
        for k in keys:
            out[k] = self.person_mask(frames[k])
        for a, b in zip(keys, keys[1:], strict=False):
            for i in range(a + 1, b):
                wb = (i - a) / (b - a)
                out[i] = cv2.addWeighted(out[a], 1.0 - wb, out[b], wb, 0.0)
        return out

    def _pixel_centres(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """x and y of every pixel centre (H, W) float32, made once per frame size."""
        if (h, w) not in self._centres:
            ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
            self._centres[(h, w)] = (xs, ys)
        return self._centres[(h, w)]

    def parse(self, frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        landmarks = np.asarray(landmarks, np.float32)
        if frames.ndim != 4 or frames.dtype != np.uint8 or landmarks.shape[0] != len(frames):
            raise ValueError(
                f"need frames (T,H,W,3) uint8 and landmarks (T,478,3), got {frames.shape} "
                f"{frames.dtype} and {landmarks.shape}"
            )
        people = self.person_masks(frames)
        return np.stack([self.parse_frame(f, lm, p) for f, lm, p in
                         zip(frames, landmarks, people, strict=True)])

    def parse_frame(
        self, frame: np.ndarray, lms: np.ndarray, person_confidence: np.ndarray | None = None
    ) -> np.ndarray:
        """One frame's labels; ``person_confidence`` (H, W) from :meth:`person_masks`, or
        the segmenter runs on this frame."""
        h, w = frame.shape[:2]
        shape = (h, w)
        poly = {k: fill_polygon(shape, lms[idx], hull=(k == "nose"))
                for k, idx in self.polygons.items()}
        oval = poly["oval"]
        if person_confidence is None:
            person_confidence = self.person_mask(frame)
        person = (person_confidence > self.person_threshold) | oval
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
        xs, ys = self._pixel_centres(h, w)
        U = (xs * eu[0] + ys * eu[1] - uc) / a
        V = (xs * ev[0] + ys * ev[1] - vc) / b
        abs_u = np.abs(U)

        features = np.zeros(shape, bool)
        for k in ("l_brow", "r_brow", "l_eye", "r_eye", "nose", "u_lip", "l_lip", "mouth"):
            features |= poly[k]
        cheeks = oval & ~features & (V > -0.3) & (V < 0.5)
        skin_model = _ColourModel(lab[cheeks]) if cheeks.sum() >= 20 else None
        above = person & ~oval & (V > -1.35) & (V < -1.02) & (abs_u < 0.5)
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
        around = person & ~oval & (V < 0.55) & (abs_u < 2.2)
        ear_band = (abs_u > 0.8) & (abs_u < 1.5) & (V > -0.45) & (V < 0.45)
        n, comp = cv2.connectedComponents(((around & skin_like) | oval).astype(np.uint8), 8)
        face_comps = np.zeros(n, bool)
        face_comps[comp[oval]] = True
        face_comps[0] = False
        skin_near = around & skin_like & face_comps[comp]
        labels[around & ~skin_near] = CLASS["hair"]
        labels[skin_near] = CLASS["skin"]
        labels[skin_near & ear_band & (U > 0)] = CLASS["l_ear"]
        labels[skin_near & ear_band & (U < 0)] = CLASS["r_ear"]
        # Below the face: neck where skin-coloured under the chin; long hair where it has the
        # hair colour and joins the hair above (checked by connected components).
        below = person & ~oval & ~around
        labels[below & skin_like & (abs_u < 0.9) & (V < 2.5)] = CLASS["neck"]
        hair = labels == CLASS["hair"]
        if hair_model is not None:
            candidates = (hair | (below & hair_like & (abs_u < 2.0))).astype(np.uint8)
            n, comp = cv2.connectedComponents(candidates, connectivity=8)
            keep = np.zeros(n, bool)
            keep[comp[hair]] = True
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
        # Each speck pixel takes the most common non-hair label of its 5x5 neighbourhood (the
        # lowest on a tie; mirrored at the border); it stays hair where all of it is hair.
        # Counted at the speck pixels only: one count image per label cost a tenth of a parse.
        not_hair = np.where(hair > 0, 255, labels).astype(np.uint8)
        padded = cv2.copyMakeBorder(not_hair, 2, 2, 2, 2, cv2.BORDER_REFLECT_101)
        ys, xs = np.nonzero(specks)
        dy, dx = np.mgrid[0:5, 0:5].reshape(2, -1)
        window = padded[ys[:, None] + dy, xs[:, None] + dx].astype(np.int64)  # (n, 25)
        rows = np.arange(len(ys))[:, None] * 256
        counts = np.bincount((rows + window).ravel(), minlength=len(ys) * 256)
        counts = counts.reshape(len(ys), 256)
        counts[:, 255] = 0  # hair
        fill = np.where(counts.max(1) > 0, counts.argmax(1), CLASS["hair"])
        labels = labels.copy()
        labels[ys, xs] = fill
    return labels


# --- trained parser plug-in ----------------------------------------------------------------


class TorchScriptParser(TorchParser):
    """A trained parser exported from PyTorch (e.g. a CelebAMask-HQ BiSeNet).

    Loads ``weights`` as a ``torch.export`` program (``.pt2``, ``torch.export.load``) or else
    as TorchScript (``torch.jit.load``; deprecated upstream but how most BiSeNet ports export),
    so no model class has to be importable here. The module takes (N, 3, S, S) float32 RGB,
    normalised with ImageNet mean/std, and returns logits (N, C, S', S') (or a tuple/list whose
    first element is that, as BiSeNet does). ``class_map`` maps its C output ids to the label
    schema (default: identity, i.e. the 19 CelebAMask-HQ classes in BiSeNet order). Frames go
    in batches of ``batch_size`` (the last one padded), so an export with a fixed batch
    dimension works when ``batch_size`` matches it. ``version`` is the weights' sha256 prefix,
    so shards record what ran. With landmarks, the beard is derived (see :class:`TorchParser`).
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        name: str = "bisenet",
        input_size: int = 512,
        class_map: Sequence[int] | None = None,
        batch_size: int = 8,
        device: str = "cpu",
        derive_beard: bool = True,
    ) -> None:
        import torch

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"parser weights {path} not found")
        self._settings = {"weights": str(path), "name": name, "input_size": input_size,
                          "class_map": None if class_map is None else list(class_map),
                          "batch_size": batch_size, "device": device,
                          "derive_beard": derive_beard}  # fmt: skip
        device = pick_device(device)
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module().to(device)
        else:
            module = torch.jit.load(str(path), map_location=device).eval()
        super().__init__(
            module, name=name, version=files_sha256(path)[:12], class_map=class_map,
            input_size=input_size, batch_size=batch_size, pad_batch=True,
            derive_beard=derive_beard, device=device,
        )  # fmt: skip

    def __reduce__(self) -> tuple:  # reload from the file (Ray workers, spawn)
        return (_rebuild_torchscript, (self._settings,))


def _rebuild_torchscript(settings: dict[str, Any]) -> TorchScriptParser:
    return TorchScriptParser(**settings)


PARSERS = ("landmarks", "bisenet", "segformer")


def is_torch_export(path: str | os.PathLike) -> bool:
    """A ``.pt2`` program or a TorchScript archive (its zip holds the module's code), as
    opposed to a pickled state dict such as ``79999_iter.pth``."""
    path = Path(path)
    if path.suffix == ".pt2":
        return True
    if not zipfile.is_zipfile(path):
        return False  # torch's legacy pickle format: a state dict
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def unseen_categories(parser: Any) -> list[str]:
    """The attribute categories (``preprocessing.labels.CATEGORIES``) whose classes ``parser``
    cannot output (its ``detects``; a parser without one is taken to see them all)."""
    detects = getattr(parser, "detects", None)
    if detects is None:
        return []
    return [c for c, ids in ATTRIBUTE_CLASSES.items() if any(LABELS[i] not in detects for i in ids)]


def load_parser(
    name: str, weights: str | os.PathLike | None = None, *, device: str = "cpu",
    segment_every: int = 1,
) -> FaceParser:
    """``landmarks`` → the offline parser (with the derived beard); ``bisenet`` →
    :class:`~preprocessing.bisenet.BiSeNetParser` for a state dict, :class:`TorchScriptParser`
    for a TorchScript / ``.pt2`` export; ``segformer`` →
    :class:`~preprocessing.segformer.SegFormerParser` for a folder. ``device``: where trained
    parsers run (``cpu``, ``cuda``, ``auto``); ``segment_every``: the offline parser's person
    segmentation on every n-th frame of a clip (:class:`LandmarkParser`)."""
    if name == "landmarks":
        parser = LandmarkBeardParser(segment_every=segment_every)
        log.info(
            "face parser 'landmarks' (offline): cannot see %s; beards come from the lower face. "
            "A trained parser sees them: preprocess.parser bisenet (79999_iter.pth) or segformer "
            "(a SegFormer folder) with preprocess.parser_weights",
            ", ".join(unseen_categories(parser)),
        )
        return parser
    if name in ("bisenet", "segformer") and weights is None:
        what = (
            "face-parsing.PyTorch's 79999_iter.pth state dict, or a torch.export .pt2 / "
            "TorchScript file of a 19-class CelebAMask-HQ BiSeNet"
            if name == "bisenet"
            else "a Hugging Face SegFormer folder (config.json + model.safetensors), e.g. "
            "jonathandinu/face-parsing"
        )
        raise FileNotFoundError(
            f"parser {name!r} needs local weights (weights=..., preprocess.parser_weights): "
            f"{what}; none can be downloaded offline — use parser 'landmarks' instead"
        )
    if name == "bisenet":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"parser weights {path} not found")
        if is_torch_export(path):
            return TorchScriptParser(path, name="bisenet", device=device)
        from preprocessing.bisenet import BiSeNetParser

        return BiSeNetParser(path, device=device)
    if name == "segformer":
        from preprocessing.segformer import SegFormerParser

        return SegFormerParser(weights, device=device)
    raise ValueError(f"unknown face parser {name!r} (known: {', '.join(PARSERS)})")


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


# --- the offline parser with the derived beard -------------------------------------------


class LandmarkBeardParser(LandmarkParser):
    """:class:`LandmarkParser` plus class 19 (``beard``) from the lower face
    (:mod:`preprocessing.beard`); what ``load_parser("landmarks")`` gives."""

    classes = list(LABELS)
    detects = LandmarkParser.detects | {"beard"}

    def __reduce__(self):  # the base class's settings, rebuilt as this class
        return (type(self), super().__reduce__()[1])

    def parse(self, frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from preprocessing.beard import add_beard

        labels = super().parse(frames, landmarks)
        return add_beard(np.asarray(frames), np.asarray(landmarks, np.float32), labels)
