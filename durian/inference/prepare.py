"""User images and driving videos → what :class:`DurianPipeline` takes.

Every image goes through the preprocessing chain as a one-frame clip (``process_clip``): face
detection, the one-face rule, the square crop of training (same margin and lift) at the model's
resolution, 478 landmarks in crop pixels and a label map. Then (method note §4):

* attribute mask ``M_attr``: the attribute image's own region of its category;
* portrait mask ``M_port = M_port_init ∪ ⋃_k align(M_attr_k)``: the portrait's own region of
  each transferred category, unioned with every attribute mask moved into portrait coordinates
  by the landmark similarity (``align_mask``), slightly dilated as in training.

A model that reads an external identity embedding (``model.identity_embedding`` dlib /
arcface) gets it from the portrait crop, computed as preprocessing computes a clip's
(:func:`portrait_identity`).

Faces are parsed by the same parser setting as preprocessing (``preprocess.parser`` /
``parser_weights``: ``landmarks``, ``bisenet`` with ``79999_iter.pth``, ``segformer`` with a
local folder; :func:`preprocessing.parsing.load_parser`). An image may carry exact labels in a
sidecar ``<image>.gt.npz`` (``landmarks`` (478, 3) and ``parsing`` (H, W) in image pixels, the
convention of synthetic videos): then no detector or parser runs. This is how attributes the
offline parser cannot see (glasses, hats, earrings) are used without a trained parser.

Every problem with the inputs raises :class:`DurianInputError` with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL.Image

from durian.data.masks import align_mask, attribute_mask, categories_present, dilate_mask
from durian.inference.errors import DurianInputError
from durian.models.config import identity_embedder_of
from preprocessing.config import CropConfig
from preprocessing.identity import FaceEmbedder, clip_identity, make_embedder
from preprocessing.labels import CATEGORIES, check_category

ImageSource = str | os.PathLike | np.ndarray | PIL.Image.Image

_DEFAULTS = CropConfig()  # the crop rule of the training data
MIN_FRACTION = 0.005  # an attribute covering less of the crop than this is "not found"


@dataclass
class PreparedFace:
    """One face, cropped and aligned at the model resolution."""

    image: np.ndarray  # (S, S, 3) uint8 crop
    landmarks: np.ndarray  # (478, 3) float32, crop pixels
    parsing: np.ndarray  # (S, S) uint8 label map
    name: str  # how messages refer to it ("portrait 'me.jpg'")


@dataclass
class PreparedAttribute:
    face: PreparedFace
    category: str
    mask: np.ndarray  # (S, S) bool, M_attr in the attribute image's own crop


@dataclass
class DrivingVideo:
    landmarks: np.ndarray  # (T, 478, 3) float32, driving frame pixels
    crops: np.ndarray  # (T, S, S, 3) uint8: the driver's face, for side-by-side output
    fps: float


def describe(source: ImageSource, role: str) -> str:
    """``role 'file.png'`` for files, ``role`` for in-memory images."""
    if isinstance(source, str | os.PathLike):
        return f"{role} '{Path(source).name}'"
    return role


def read_image(source: ImageSource, name: str = "image") -> np.ndarray:
    """An image file / array / PIL image → (H, W, 3) uint8 RGB (alpha dropped, EXIF-upright).
    ``name`` is how error messages call it (see :func:`describe`)."""
    if isinstance(source, PIL.Image.Image):
        return np.asarray(source.convert("RGB"))
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 1:
            raise DurianInputError(f"cannot read {name}: expected an H×W×3 image, got {arr.shape}")
        if arr.dtype != np.uint8:
            scale = 255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else 1.0
            arr = np.clip(arr * scale, 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])
    path = Path(source)
    if not path.is_file():
        raise DurianInputError(f"cannot read {name}: file not found ({path})")
    try:
        with PIL.Image.open(path) as im:
            from PIL import ImageOps

            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
        raise DurianInputError(
            f"cannot read {name}: not a readable image ({type(err).__name__})"
        ) from None


def read_ground_truth(source: ImageSource, shape: tuple[int, int]) -> dict[str, np.ndarray] | None:
    """Exact labels from ``<image>.gt.npz`` next to an image file, or None."""
    if not isinstance(source, str | os.PathLike):
        return None
    sidecar = Path(source).with_suffix(".gt.npz")
    if not sidecar.is_file():
        return None
    with np.load(sidecar) as gt:
        landmarks = np.asarray(gt["landmarks"], np.float32).reshape(1, 478, -1)
        parsing = np.asarray(gt["parsing"]).reshape(1, *gt["parsing"].shape[-2:])
    if parsing.shape[1:] != tuple(shape):
        raise DurianInputError(
            f"labels {sidecar.name} are {parsing.shape[1:]} but the image is {tuple(shape)}"
        )
    if landmarks.shape[-1] == 2:
        landmarks = np.concatenate([landmarks, np.zeros_like(landmarks[..., :1])], axis=-1)
    return {"landmarks": landmarks, "parsing": parsing.astype(np.uint8)}


def parse_attribute_spec(spec: str) -> tuple[str, str | None]:
    """``IMG[:category]`` → (image path, category or None). A colon is a category separator
    only if what follows names no path (so ``C:/x.png`` and ``a:b.png`` stay paths); the
    category, if any, must be a known one."""
    path, sep, category = spec.rpartition(":")
    if not sep or not path or "/" in category or "\\" in category or "." in category:
        return spec, None
    if not category:
        raise DurianInputError(f"empty attribute category in {spec!r} (use IMG or IMG:category)")
    return path, check_attribute_category(category, path)


def check_attribute_category(category: str, image: ImageSource = "") -> str:
    try:
        return check_category(category.strip().lower())
    except ValueError:
        where = f" for {describe(image, 'attribute')}" if image != "" else ""
        raise DurianInputError(
            f"unknown attribute category {category!r}{where} (known: {', '.join(CATEGORIES)})"
        ) from None


def check_alpha(alpha: float | None, alpha_ramp: bool, num_attributes: int) -> None:
    """Interpolation takes exactly two attributes and one of: alpha in [0, 1], or a ramp."""
    if alpha is not None and alpha_ramp:
        raise DurianInputError("give either alpha or an alpha ramp, not both")
    if alpha is None and not alpha_ramp:
        return
    what = f"alpha={alpha}" if alpha is not None else "an alpha ramp"
    if num_attributes != 2:
        raise DurianInputError(
            f"{what} interpolates between exactly 2 attributes, got {num_attributes}"
        )
    if alpha is not None and not (np.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise DurianInputError(f"alpha must be between 0 and 1, got {alpha}")


class Preparer:
    """Detects, crops, aligns and parses faces at ``size`` with the training crop rule.

    The face analyzer and parser are created on first use and closed by :meth:`close` (or the
    ``with`` block). ``parser``: a parser name for ``preprocessing.parsing.load_parser`` (with
    its ``parser_weights``, run on ``parser_device``) or a parser object."""

    def __init__(
        self,
        size: int,
        *,
        margin: float = _DEFAULTS.margin,
        min_face_size: float = _DEFAULTS.min_face_size,
        parser: Any = "landmarks",
        parser_weights: str | os.PathLike | None = None,
        parser_device: str = "cpu",
        max_side: int = 1536,
        arcface_model: str | os.PathLike | None = None,
    ) -> None:
        self.size = int(size)
        self.margin = float(margin)
        self.min_face_size = float(min_face_size)
        self.max_side = int(max_side)
        self._parser_spec = parser
        self._parser_weights = parser_weights
        self._parser_device = parser_device
        self._parser: Any = None
        self._analyzer: Any = None
        self.arcface_model = arcface_model  # the ONNX file of a model that reads ArcFace's
        self._embedders: dict[str, FaceEmbedder] = {}

    def __enter__(self) -> Preparer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for obj in (self._analyzer, self._parser):
            close = getattr(obj, "close", None)
            if close is not None:
                close()
        self._analyzer = None
        self._parser = None

    @property
    def analyzer(self) -> Any:
        if self._analyzer is None:
            from preprocessing.faces import FaceAnalyzer

            self._analyzer = FaceAnalyzer()
        return self._analyzer

    @property
    def parser(self) -> Any:
        if self._parser is None:
            if isinstance(self._parser_spec, str):
                from preprocessing.parsing import load_parser

                try:
                    self._parser = load_parser(
                        self._parser_spec, self._parser_weights, device=self._parser_device
                    )
                except (OSError, ValueError) as err:  # missing / wrong checkpoint: the user's
                    raise DurianInputError(f"face parser: {err}") from None
            else:
                self._parser = self._parser_spec
        return self._parser

    def unseen_categories(self) -> list[str]:
        """The attribute categories the parser cannot see (empty for trained parsers)."""
        from preprocessing.parsing import unseen_categories

        return unseen_categories(self.parser)

    def face(self, source: ImageSource, role: str = "portrait") -> PreparedFace:
        """One still with one face → :class:`PreparedFace` (raises DurianInputError)."""
        from preprocessing.crop import process_clip
        from preprocessing.faces import ClipRejected

        name = describe(source, role)
        image = read_image(source, name)
        gt = read_ground_truth(source, image.shape[:2])
        if gt is None and max(image.shape[:2]) > self.max_side:
            # Very large photos: detection cost grows with pixels, the crop is tiny anyway.
            f = self.max_side / max(image.shape[:2])
            image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        try:
            clip = process_clip(
                image[None],
                fps=1.0,
                size=self.size,
                margin=self.margin,
                min_face_size=self.min_face_size,
                parser=None if gt is not None else self.parser,
                analyzer=None if gt is not None else self.analyzer,
                ground_truth=gt,
                smooth_window=1,
            )
        except ClipRejected as err:
            raise face_error(err, name) from None
        return PreparedFace(clip.frames[0], clip.landmarks[0], clip.parsing[0], name)

    def identity_embedding(
        self, face: PreparedFace, model_config: Mapping[str, Any]
    ) -> np.ndarray | None:
        """The identity embedding a model (its ``model.config``) reads from the portrait, or
        None for one that embeds the portrait with CLIP itself."""
        kind = identity_embedder_of(model_config)
        if kind is None:
            return None
        if kind not in self._embedders:
            try:
                self._embedders[kind] = make_embedder(kind, self.arcface_model)
            except (ImportError, OSError, ValueError) as err:
                why = f"the model reads {kind} identity embeddings: {err}"
                raise DurianInputError(why) from None
        return portrait_identity(self._embedders[kind], face.image, face.name)

    def attribute(
        self, source: ImageSource, category: str | None, role: str = "attribute"
    ) -> PreparedAttribute:
        """An attribute image and its category (None: the one the parser finds most of)."""
        if category is not None:
            category = check_attribute_category(category, source)
        face = self.face(source, role)
        present = categories_present(face.parsing, MIN_FRACTION)
        if category is None:
            if not present:
                raise DurianInputError(
                    f"no attribute found in its image {face.name} (looked for: "
                    f"{', '.join(CATEGORIES)}); name one as IMG:category"
                )
            fractions = [float(attribute_mask(face.parsing, c).mean()) for c in present]
            category = present[int(np.argmax(fractions))]
        elif category not in present:
            found = ", ".join(present) or "none"
            hint = ""
            if category in self.unseen_categories():
                name = getattr(self.parser, "name", "")
                hint = (
                    f"; the face parser '{name}' cannot see {category}: give the image exact "
                    "labels (<image>.gt.npz) or a trained parser (--parser bisenet|segformer "
                    "--parser-weights …)"
                )
            raise DurianInputError(
                f"attribute '{category}' not found in its image {face.name} (found: {found}){hint}"
            )
        return PreparedAttribute(face, category, attribute_mask(face.parsing, category))

    def driving_video(
        self, path: str | os.PathLike, max_frames: int | None = None, max_side: int = 640
    ) -> DrivingVideo:
        """The driver's face track in a video (first ``max_frames`` frames)."""
        from preprocessing.faces import ClipRejected, crop_boxes, crop_frames, select_track
        from preprocessing.video import VideoError, probe_video, read_frames

        name = f"driving video '{Path(path).name}'"
        try:
            info = probe_video(path)
            frames, _ = read_frames(path, count=max_frames, max_side=max_side)
        except VideoError as err:
            reason = getattr(err, "reason", "unreadable").replace("_", " ")
            raise DurianInputError(f"cannot read {name}: {reason}") from None
        if len(frames) == 0:
            raise DurianInputError(f"cannot read {name}: no frames")
        fps = info.fps if np.isfinite(info.fps) and info.fps > 0 else 25.0
        scale = max(info.width, info.height) / max(frames.shape[1:3])
        try:
            per_frame = self.analyzer.landmarks(frames, fps)
            # Size rule in the video's own pixels, not the downscaled decode.
            # Same multiple-faces rule as preprocessing: a passer-by does not reject a driver.
            track = select_track(
                per_frame, self.min_face_size / max(scale, 1.0),
                second_face_min_ratio=_DEFAULTS.second_face_min_ratio,
                second_face_min_fraction=_DEFAULTS.second_face_min_fraction,
            )  # fmt: skip
        except ClipRejected as err:
            raise face_error(err, name) from None
        boxes = crop_boxes(track, margin=self.margin)
        return DrivingVideo(track, crop_frames(frames, boxes, self.size), float(fps))


def portrait_identity(embedder: FaceEmbedder, image: np.ndarray, name: str) -> np.ndarray:
    """The (D,) float32 identity embedding of a portrait crop, computed as preprocessing computes
    a clip's on one of its crop frames (:func:`preprocessing.identity.clip_identity`); raises
    :class:`DurianInputError` when the embedder finds no face in it."""
    embedding, _ = clip_identity(image[None], embedder, tries=1)
    if embedding is None:
        raise DurianInputError(
            f"the {embedder.name} face embedder finds no face in the {name}, and the model reads "
            "its identity embedding"
        )
    return embedding


def face_error(err: Exception, name: str) -> DurianInputError:
    """A one-line message for a face rejection (``ClipRejected``) of ``name``."""
    reason = getattr(err, "reason", "")
    detail = getattr(err, "detail", "") or str(err)
    if reason == "no_face":
        return DurianInputError(f"no face found in the {name}")
    if reason == "multiple_faces":
        return DurianInputError(f"several faces in the {name}: use one with a single person")
    if reason == "face_too_small":
        return DurianInputError(
            f"the face in the {name} is too small ({detail}): use a larger or closer view"
        )
    return DurianInputError(f"{name}: {detail}")


def portrait_mask(
    portrait: PreparedFace, attributes: list[PreparedAttribute], dilation: float = 0.015
) -> np.ndarray:
    """``M_port``: the portrait's own region of every transferred category ∪ each attribute's
    mask aligned into portrait coordinates, dilated by ``dilation`` × side (training's mean)."""
    shape = portrait.parsing.shape
    mask = np.zeros(shape, bool)
    for attr in attributes:
        mask |= attribute_mask(portrait.parsing, attr.category)
        mask |= align_mask(attr.mask, attr.face.landmarks, portrait.landmarks, shape)
    return dilate_mask(mask, int(round(dilation * max(shape))))
