"""Identity similarity with dlib's face embedding on real photos that ship in packages."""

from __future__ import annotations

import math

import cv2
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image
from skimage import data

from durian.evaluation.identity import (
    ARCFACE_TEMPLATE,
    ArcFaceEmbedder,
    DlibEmbedder,
    FaceEmbedder,
    align_face,
    five_points_from_68,
    frame_subset,
    identity_similarity,
    make_embedder,
)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        return np.asarray(im.convert("RGB"))


def _face_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """A small square crop around the face, like the evaluation frames (64-128 px)."""
    top, left, side = box[0], box[1], box[2]
    return cv2.resize(
        image[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA
    )


def test_same_person_is_more_similar_than_another_person(dlib_embedder, astronaut, hopper):
    e = dlib_embedder
    ref = e.embed(astronaut)
    assert ref is not None and ref.shape == (128,)
    flipped = e.embed(np.ascontiguousarray(astronaut[:, ::-1]))
    brighter = e.embed(np.clip(astronaut.astype(np.int16) + 40, 0, 255).astype(np.uint8))
    other = e.embed(hopper)
    same = [e.similarity(ref, flipped), e.similarity(ref, brighter)]
    different = e.similarity(ref, other)
    # dlib's same-person threshold: distance 0.6, i.e. similarity 0.4
    assert min(same) > 0.6 and different < 0.4
    assert min(same) - different > 0.3
    assert e.similarity(ref, ref) == 1.0


def test_small_face_crops_are_upscaled_for_detection(dlib_embedder, astronaut):
    # the astronaut's face at 96 px (HOG alone needs ~80 px faces at native size)
    crop = _face_crop(astronaut, (20, 140, 220), 96)
    emb = dlib_embedder.embed(crop)
    assert emb is not None
    assert dlib_embedder.similarity(dlib_embedder.embed(astronaut), emb) > 0.5


def test_identity_similarity_over_frames_and_missing_faces(dlib_embedder, astronaut, hopper):
    e = dlib_embedder
    ref = e.embed(astronaut)
    grey = np.full((64, 64, 3), 128, np.uint8)
    value, why = identity_similarity(e, ref, [astronaut[:, ::-1].copy(), grey])
    assert why is None and value > 0.6  # the frame without a face is left out, not scored
    value, why = identity_similarity(e, ref, [grey, grey])
    assert math.isnan(value) and "no face found in any of 2 output frames" in why
    value, why = identity_similarity(e, e.embed(grey), [astronaut])
    assert math.isnan(value) and "portrait" in why
    same, _ = identity_similarity(e, ref, [astronaut[:, ::-1].copy()])
    other, _ = identity_similarity(e, ref, [hopper])
    assert same > other


class _MeanColourEmbedder:
    """A plug-in in a dozen lines: anything with ``name``, ``embed`` and ``similarity``."""

    name = "mean-colour"

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        return image.reshape(-1, 3).mean(0) if image.any() else None

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(-np.abs(a - b).sum())


def test_other_embedders_plug_in():
    e = _MeanColourEmbedder()
    assert isinstance(e, FaceEmbedder) and isinstance(DlibEmbedder, type)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    value, why = identity_similarity(e, e.embed(red), [red, np.zeros_like(red)])
    assert value == 0.0 and why is None


def test_frame_subset_spreads_evenly():
    assert frame_subset(8, 4).tolist() == [0, 2, 5, 7]
    assert frame_subset(3, 4).tolist() == [0, 1, 2]
    assert frame_subset(5, 0).tolist() == [0, 1, 2, 3, 4]


def test_arcface_alignment_maps_the_five_points_onto_the_template():
    # a face twice the template size, shifted: alignment must undo scale and shift
    points = ARCFACE_TEMPLATE * 2 + [30, 10]
    image = np.zeros((300, 300, 3), np.uint8)
    for x, y in points.round().astype(int):
        cv2.circle(image, (int(x), int(y)), 3, (255, 255, 255), -1)
    crop = align_face(image, points)
    assert crop.shape == (112, 112, 3)
    for x, y in ARCFACE_TEMPLATE.round().astype(int):
        assert crop[y, x].max() > 200  # each point lands where ArcFace expects it
    p68 = np.zeros((68, 2))
    p68[36:42], p68[42:48], p68[30], p68[48], p68[54] = [1, 1], [5, 1], [3, 3], [2, 5], [4, 5]
    assert five_points_from_68(p68).tolist() == [[1, 1], [5, 1], [3, 3], [2, 5], [4, 5]]


def test_arcface_needs_its_local_model(tmp_path):
    with pytest.raises(ValueError, match="arcface_model"):
        make_embedder("arcface", None)
    with pytest.raises(FileNotFoundError):
        ArcFaceEmbedder(tmp_path / "missing.onnx")
    assert make_embedder("dlib").name == "dlib"
