"""User images → crops, landmarks, labels and masks; the input checks."""

from __future__ import annotations

import numpy as np
import pytest
from inference_helpers import SIZE, astronaut, grace_hopper, save_png, synthetic_portrait

from durian.data.masks import attribute_mask
from durian.inference.errors import DurianInputError
from durian.inference.prepare import (
    Preparer,
    check_alpha,
    parse_attribute_spec,
    portrait_mask,
)


@pytest.fixture(scope="module")
def prep():
    with Preparer(SIZE) as p:
        yield p


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("media")
    return {
        "astronaut": save_png(d / "astronaut.png", astronaut()),
        "grace": save_png(d / "grace.png", grace_hopper()),
        "glasses": synthetic_portrait(d / "glasses.png", seed=3, categories=("hair", "glasses")),
    }


def test_face_is_cropped_at_model_resolution_with_landmarks_and_labels(prep, media) -> None:
    face = prep.face(media["astronaut"])
    assert face.image.shape == (SIZE, SIZE, 3) and face.image.dtype == np.uint8
    assert face.landmarks.shape == (478, 3) and face.parsing.shape == (SIZE, SIZE)
    # The training crop rule: the face sits in the middle, with room for hair above it.
    xy = face.landmarks[:, :2]
    assert 0.25 * SIZE < xy[:, 0].mean() < 0.75 * SIZE
    assert xy.min() > 0 and xy.max() < SIZE
    assert attribute_mask(face.parsing, "hair")[: SIZE // 3].mean() > 0.1
    assert face.name == "portrait 'astronaut.png'"
    # A PIL image or an array gives the same crop as the file.
    assert np.array_equal(prep.face(astronaut()).image, face.image)


def test_category_is_inferred_or_checked(prep, media) -> None:
    assert prep.attribute(media["grace"], None).category == "hair"
    # Exact labels from the sidecar let glasses through (the landmark parser cannot see them).
    glasses = prep.attribute(media["glasses"], "glasses")
    assert glasses.category == "glasses" and glasses.mask.mean() > 0.005
    assert np.array_equal(glasses.mask, attribute_mask(glasses.face.parsing, "glasses"))
    with pytest.raises(DurianInputError, match=r"attribute 'glasses' not found in its image"):
        prep.attribute(media["astronaut"], "glasses")
    with pytest.raises(DurianInputError, match="unknown attribute category 'wings'"):
        prep.attribute(media["astronaut"], "wings")


def test_portrait_mask_is_own_region_and_aligned_attribute_masks(prep, media) -> None:
    from durian.data.masks import align_mask

    portrait = prep.face(media["astronaut"])
    hair = prep.attribute(media["grace"], "hair")
    glasses = prep.attribute(media["glasses"], "glasses")
    m = portrait_mask(portrait, [hair, glasses], dilation=0.0)
    own_hair = attribute_mask(portrait.parsing, "hair")
    aligned = [
        align_mask(a.mask, a.face.landmarks, portrait.landmarks, (SIZE, SIZE))
        for a in (hair, glasses)
    ]
    assert np.array_equal(m, own_hair | aligned[0] | aligned[1])
    # The glasses land on the portrait's eyes: around the eye landmarks, not elsewhere.
    eyes = portrait.landmarks[[33, 133, 362, 263], :2].round().astype(int)
    assert aligned[1][eyes[:, 1], eyes[:, 0]].mean() >= 0.5
    assert aligned[1].mean() < 0.2
    dilated = portrait_mask(portrait, [hair, glasses])
    assert dilated.sum() > m.sum() and np.all(dilated[m])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a.png", ("a.png", None)),
        ("a.png:hair", ("a.png", "hair")),
        ("dir/a.png:Glasses", ("dir/a.png", "glasses")),
        ("C:/x/a.png", ("C:/x/a.png", None)),
        ("odd:name.png", ("odd:name.png", None)),
    ],
)
def test_attribute_spec(spec, expected) -> None:
    assert parse_attribute_spec(spec) == expected


def test_attribute_spec_unknown_category() -> None:
    with pytest.raises(DurianInputError, match=r"unknown attribute category 'wings'.*known: hair"):
        parse_attribute_spec("a.png:wings")


@pytest.mark.parametrize(
    ("alpha", "ramp", "n", "message"),
    [
        (1.5, False, 2, "alpha must be between 0 and 1, got 1.5"),
        (-0.1, False, 2, "alpha must be between 0 and 1"),
        (float("nan"), False, 2, "alpha must be between 0 and 1"),
        (0.5, False, 1, "exactly 2 attributes, got 1"),
        (None, True, 3, "exactly 2 attributes, got 3"),
        (0.5, True, 2, "not both"),
    ],
)
def test_alpha_checks(alpha, ramp, n, message) -> None:
    with pytest.raises(DurianInputError, match=message):
        check_alpha(alpha, ramp, n)


def test_alpha_accepted() -> None:
    for alpha, ramp, n in ((0.0, False, 2), (1.0, False, 2), (None, True, 2), (None, False, 5)):
        check_alpha(alpha, ramp, n)


def test_error_messages_are_one_line() -> None:
    assert str(DurianInputError("a\nb  c")) == "a b c"
