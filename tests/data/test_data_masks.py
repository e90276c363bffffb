from pathlib import Path

import cv2
import numpy as np
import pytest
from data_synth import make_clip

from preprocessing.labels import CLASS
from durian.data.masks import (
    BankEntries,
    BankExpander,
    MaskBank,
    MaskExpander,
    align_mask,
    attribute_mask,
    attribute_reference,
    build_mask_bank,
    categories_present,
    expand_mask,
    identity_mask,
    identity_reference,
    similarity_from_landmarks,
)


def _labels() -> np.ndarray:
    labels = np.full((16, 16), CLASS["skin"], np.uint8)
    labels[:4] = CLASS["hair"]
    labels[8, 2:14] = CLASS["eye_g"]
    labels[15, :] = CLASS["background"]
    return labels


def _similarity(angle_deg: float, scale: float, t: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.array(t)[:, None]])


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts[:, :2] @ matrix[:, :2].T + matrix[:, 2]


def test_attribute_mask_selects_category_classes() -> None:
    labels = _labels()
    assert attribute_mask(labels, "hair").sum() == 4 * 16
    assert attribute_mask(labels, "glasses").sum() == 12
    assert not attribute_mask(labels, "hat").any()
    with pytest.raises(ValueError, match="unknown attribute category"):
        attribute_mask(labels, "scarf")


def test_references_are_complementary() -> None:
    labels = _labels()
    image = np.random.default_rng(0).integers(1, 256, (16, 16, 3), dtype=np.uint8)
    m_attr = attribute_mask(labels, "hair")
    extra = np.zeros_like(m_attr)
    extra[4:6] = True
    m_port = identity_mask(labels, "hair", expansion=extra)
    ident = identity_reference(image, m_port)
    attr = attribute_reference(image, m_attr)
    assert not ident[m_port].any()  # identity reference has zero attribute pixels
    np.testing.assert_array_equal(ident[~m_port], image[~m_port])
    assert not attr[~m_attr].any()  # attribute reference only attribute pixels
    np.testing.assert_array_equal(attr[m_attr], image[m_attr])
    # Without expansion the two references partition the frame.
    np.testing.assert_array_equal(identity_reference(image, m_attr) + attr, image)


def test_categories_present_respects_min_fraction() -> None:
    labels = _labels()  # hair 25 %, glasses 12/256 ≈ 4.7 %
    assert categories_present(labels, 0.01) == ["hair", "glasses"]
    assert categories_present(labels, 0.1) == ["hair"]
    assert categories_present(labels, 0.0) == ["hair", "glasses"]
    assert categories_present(np.zeros((4, 4), np.uint8), 0.0) == []


def test_similarity_recovers_known_transform() -> None:
    src = np.random.default_rng(1).uniform(0, 100, (478, 3))
    known = _similarity(17.0, 1.3, (5.0, -8.0))
    est = similarity_from_landmarks(src, _apply(known, src))
    np.testing.assert_allclose(est, known, atol=1e-9)


def test_align_mask_lands_where_expected() -> None:
    src = np.random.default_rng(2).uniform(20, 44, (478, 2))
    mask = np.zeros((64, 64), bool)
    cv2.circle(mask.view(np.uint8), (30, 30), 4, 1, -1)
    known = _similarity(-25.0, 0.8, (12.0, 6.0))
    out = align_mask(mask, src, _apply(known, src), (80, 96))
    assert out.shape == (80, 96) and out.dtype == bool
    ys, xs = np.nonzero(out)
    expected = _apply(known, np.array([[30.0, 30.0]]))[0]
    np.testing.assert_allclose([xs.mean(), ys.mean()], expected, atol=0.5)
    assert abs(out.sum() - mask.sum() * 0.8**2) < 0.25 * mask.sum()


def _bank_with_square(identity: str, src_lms: np.ndarray) -> MaskBank:
    mask = np.zeros((1, 32, 32), bool)
    mask[0, 2:8, 10:20] = True
    entries = BankEntries(mask, src_lms[None].astype(np.float32), np.array([identity]))
    return MaskBank(size=32, entries={"hair": entries})


def test_expand_mask_unions_aligned_bank_masks() -> None:
    rng = np.random.default_rng(3)
    bank_lms = rng.uniform(8, 24, (478, 2))
    known = _similarity(0.0, 2.0, (4.5, 3.5))  # bank face (32 px) → this face (64 px)
    own_lms = _apply(known, bank_lms)
    own = np.zeros((64, 64), bool)
    own[40:50, 40:50] = True
    bank = _bank_with_square("other", bank_lms)
    out = expand_mask(own, own_lms, bank, "hair", "me", rng, n_union=1, dilation_range=(0, 0))
    assert (out >= own).all()
    expected = np.zeros_like(own)
    expected[2 * 2 + 3 : 2 * 8 + 3, 2 * 10 + 4 : 2 * 20 + 4] = True  # half-pixel offsets: no ties
    np.testing.assert_array_equal(out, own | expected)


def test_expand_mask_never_uses_own_identity_and_dilates() -> None:
    rng = np.random.default_rng(4)
    lms = rng.uniform(8, 24, (478, 2))
    own = np.zeros((32, 32), bool)
    own[12:20, 12:20] = True
    bank = _bank_with_square("me", lms)
    same = expand_mask(own, lms, bank, "hair", "me", rng, dilation_range=(0, 0))
    np.testing.assert_array_equal(same, own)
    grown = expand_mask(own, lms, None, "hair", "me", rng, dilation_range=(0.1, 0.1))
    assert (grown >= own).all() and grown.sum() > own.sum()
    # An unknown category in the bank: nothing to union, still ⊇ own.
    np.testing.assert_array_equal(expand_mask(own, lms, bank, "hat", None, rng, 3, (0, 0)), own)


def test_bank_expander_is_a_mask_expander() -> None:
    expander = BankExpander(None, dilation_range=(0.0, 0.0))
    assert isinstance(expander, MaskExpander)
    own = np.eye(8, dtype=bool)
    out = expander(own, np.zeros((8, 8, 3), np.uint8), np.zeros((478, 2)), "hair", None,
                   np.random.default_rng(0))  # fmt: skip
    np.testing.assert_array_equal(out, own)


def test_build_mask_bank_limits_records_and_roundtrips(tmp_path: Path) -> None:
    clips = [
        make_clip(num_frames=4, size=32, categories=("hair", "glasses"), identity=f"p{i}", seed=i)
        for i in range(6)
    ]
    bank = build_mask_bank(clips, 4, np.random.default_rng(0), size=24)
    assert bank.counts()["hair"] == 4 and bank.counts()["glasses"] == 4
    assert bank.counts()["hat"] == 0
    hair = bank.get("hair")
    assert hair.masks.shape == (4, 24, 24) and hair.landmarks.shape == (4, 478, 2)
    assert set(hair.identities) <= {f"p{i}" for i in range(6)}
    assert all(m.any() for m in hair.masks)
    assert len(bank.candidates("hair", str(hair.identities[0]))) < 4

    again = build_mask_bank(clips, 4, np.random.default_rng(0), size=24)
    np.testing.assert_array_equal(again.get("hair").masks, hair.masks)

    path = tmp_path / "bank" / "masks.npz"
    bank.save(path)
    loaded = MaskBank.load(path)
    assert loaded.size == 24 and loaded.counts() == bank.counts()
    for cat in ("hair", "glasses"):
        np.testing.assert_array_equal(loaded.get(cat).masks, bank.get(cat).masks)
        np.testing.assert_array_equal(loaded.get(cat).landmarks, bank.get(cat).landmarks)
        np.testing.assert_array_equal(loaded.get(cat).identities, bank.get(cat).identities)


def test_frames_without_landmarks_are_not_aligned() -> None:
    rng = np.random.default_rng(5)
    lms = rng.uniform(8, 24, (478, 2))
    own = np.zeros((32, 32), bool)
    own[12:20, 12:20] = True
    bank = _bank_with_square("other", lms)
    missing = np.full((478, 2), np.nan)
    out = expand_mask(own, missing, bank, "hair", "me", rng, dilation_range=(0, 0))
    np.testing.assert_array_equal(out, own)
    clip = make_clip(num_frames=2, size=32)
    clip.landmarks[:] = np.nan
    assert build_mask_bank([clip], 4, rng, frames_per_clip=2).counts()["hair"] == 0
