"""Cross-identity ground truth: swapping one attribute changes only that attribute's region."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from preprocessing.labels import ATTRIBUTE_CLASSES
from synthetic import (
    Attributes,
    Beard,
    Glasses,
    Hair,
    Hat,
    load_transfer_cases,
    make_transfer_cases,
    random_identity,
    random_motion,
    render_transfer,
    render_video,
    save_transfer_cases,
)

X_ATTRS = Attributes(hair=Hair(style="short", color=(40, 30, 25)),
                     glasses=Glasses(shape="round"), hat=None,
                     beard=Beard(style="goatee"))
Y_ATTRS = Attributes(hair=Hair(style="long", fringe="side", color=(210, 170, 110), volume=1.4),
                     glasses=Glasses(shape="cateye", frame=(170, 30, 40), opacity=0.85,
                                     tint=(30, 35, 40)),
                     hat=Hat(style="fedora"), beard=Beard(style="full", thickness=1.2))


def _region(labels: np.ndarray, category: str) -> np.ndarray:
    return np.isin(labels, list(ATTRIBUTE_CLASSES[category]))


@pytest.mark.parametrize("category", ["hair", "glasses", "hat", "beard"])
def test_transfer_changes_only_the_attribute_region(category):
    rng = np.random.default_rng(1)
    identity_x = random_identity(rng)
    motion = random_motion(rng, 3)
    # Without supersampling every pixel shows exactly one material, so the claim is exact.
    src = render_video(identity_x, X_ATTRS, motion, 128, 7, supersample=1)
    tgt = render_transfer(identity_x, Y_ATTRS, motion, 128, 7, category=category,
                          attributes_x=X_ATTRS, supersample=1)
    np.testing.assert_array_equal(src[2], tgt[2])  # same face, same motion: same landmarks
    for t in range(3):
        # What the attribute occludes or reveals lies inside its old or new region.
        region = _region(src[1][t], category) | _region(tgt[1][t], category)
        assert _region(tgt[1][t], category).sum() > 10
        label_diff = src[1][t] != tgt[1][t]
        assert label_diff.any() and not label_diff[~region].any()
        if category != "glasses":  # lenses are see-through: what is behind them shows
            region |= _region(src[1][t], "glasses")
        pixel_diff = (src[0][t] != tgt[0][t]).any(-1)
        assert not pixel_diff[~region].any()
    # Anti-aliased renders agree with that up to sub-pixel slivers at region boundaries.
    src_aa = render_video(identity_x, X_ATTRS, motion, 128, 7)
    tgt_aa = render_transfer(identity_x, Y_ATTRS, motion, 128, 7, category=category,
                             attributes_x=X_ATTRS)
    near = cv2.dilate(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert ((src_aa[0][2] != tgt_aa[0][2]).any(-1) & ~near).sum() <= 3


def test_render_transfer_without_category_uses_all_of_y():
    rng = np.random.default_rng(2)
    identity_x, motion = random_identity(rng), random_motion(rng, 2)
    a = render_transfer(identity_x, Y_ATTRS, motion, 64, 3)
    b = render_video(identity_x, Y_ATTRS, motion, 64, 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_transfer_cases_are_exact_deterministic_and_round_trip(tmp_path):
    cases = make_transfer_cases(4, 3, 64, seed=11)
    assert [c.category for c in cases] == ["hair", "glasses", "hat", "beard"]
    again = make_transfer_cases(1, 3, 64, seed=11)[0]
    np.testing.assert_array_equal(again.target_frames, cases[0].target_frames)
    for case in cases:
        assert case.target_frames.shape == (3, 64, 64, 3)
        assert case.target_labels.shape == (3, 64, 64)
        assert case.driving_landmarks.shape == (3, 478, 3)
        assert getattr(case.attributes_y, case.category) is not None
        assert _region(case.attribute_labels, case.category).any()
        # Frame 0 of the target is the portrait with only the attribute region changed.
        region = _region(case.portrait_labels, case.category) | _region(
            case.target_labels[0], case.category)
        near = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        diff = case.portrait_labels != case.target_labels[0]
        assert not diff[~near].any()  # (a boundary pixel's majority may flip)
        np.testing.assert_array_equal(case.portrait_landmarks, case.driving_landmarks[0])
    index = save_transfer_cases(cases, tmp_path)
    assert index.name == "index.json"
    loaded = load_transfer_cases(tmp_path)
    assert len(loaded) == 4
    for a, b in zip(cases, loaded, strict=True):
        assert a.meta() == b.meta()
        for name in ("portrait", "attribute_image", "driving_landmarks", "target_frames",
                     "target_labels"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        # The stored parameters reproduce the stored target exactly.
        frames = render_transfer(b.identity_x, b.attributes_y, b.motion, 64, b.background,
                                 category=b.category, attributes_x=b.attributes_x)[0]
        np.testing.assert_array_equal(frames, b.target_frames)
