"""Attribute similarity on the attribute crop: small arrays with hand-known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from durian.evaluation.attribute import (
    ClipImageEncoder,
    attribute_similarity,
    color_histogram_similarity,
    crop_ssim,
    mask_bbox,
)


def _patch_image(colour, at=(4, 4), size=(6, 8), shape=(24, 24), seed=None):
    """An image with a coloured (optionally textured) rectangle and its mask."""
    img = np.zeros((*shape, 3), np.uint8)
    mask = np.zeros(shape, bool)
    y, x = at
    mask[y : y + size[0], x : x + size[1]] = True
    img[mask] = colour
    if seed is not None:
        texture = np.random.default_rng(seed).integers(0, 60, (*size, 3))
        img[y : y + size[0], x : x + size[1]] = np.clip(np.array(colour) + texture - 30, 0, 255)
    return img, mask


def test_mask_bbox():
    m = np.zeros((10, 10), bool)
    assert mask_bbox(m) is None
    m[2:5, 3] = True
    m[4, 7] = True
    assert mask_bbox(m) == (slice(2, 5), slice(3, 8))


def test_histogram_similarity_by_hand():
    red, m = _patch_image((200, 10, 10))
    blue, _ = _patch_image((10, 10, 200))
    assert color_histogram_similarity(red, m, red, m) == 1.0
    assert color_histogram_similarity(red, m, blue, m) == 0.0  # disjoint colours
    half = red.copy()
    half[4:7, 4:12] = (10, 10, 200)  # half the patch's pixels turn blue
    assert color_histogram_similarity(red, m, half, m) == pytest.approx(0.5)
    # pose-independent: the same patch elsewhere, in a bigger image, is the same colours
    moved, m2 = _patch_image((200, 10, 10), at=(10, 1), shape=(32, 32))
    assert color_histogram_similarity(red, m, moved, m2) == 1.0


def test_crop_ssim_identical_moved_and_different():
    a, m = _patch_image((180, 120, 40), seed=0)
    assert crop_ssim(a, m, a, m) == pytest.approx(1.0)
    # the box aligns the crops: the same textured patch elsewhere still scores 1
    b, mb = _patch_image((180, 120, 40), at=(12, 9), seed=0)
    assert crop_ssim(a, m, b, mb) == pytest.approx(1.0)
    c, mc = _patch_image((180, 120, 40), seed=1)  # same colour, other texture
    assert crop_ssim(a, m, c, mc) < 0.9


def test_empty_masks_are_left_out():
    a, m = _patch_image((200, 10, 10))
    empty = np.zeros_like(m)
    assert math.isnan(color_histogram_similarity(a, empty, a, m))
    assert math.isnan(crop_ssim(a, m, a, empty))
    out = attribute_similarity([a, a], [empty, empty], a, m)
    assert math.isnan(out["attr_hist_sim"]) and math.isnan(out["attr_crop_ssim"])


def test_attribute_similarity_means_over_frames_with_a_mask():
    ref, m = _patch_image((200, 10, 10), seed=2)
    other, _ = _patch_image((10, 200, 10), seed=3)
    empty = np.zeros_like(m)
    same = attribute_similarity([ref, ref, other], [m, m, empty], ref, m)
    assert same["attr_hist_sim"] == 1.0 and same["attr_crop_ssim"] == pytest.approx(1.0)
    mixed = attribute_similarity([ref, other], [m, m], ref, m)
    assert mixed["attr_hist_sim"] == pytest.approx(0.5)
    assert mixed["attr_crop_ssim"] < same["attr_crop_ssim"]
    assert "attr_clip_sim" not in mixed


def test_clip_similarity_with_a_local_clip_folder(tmp_path):
    from sd_helpers import tiny_clip

    tiny_clip(projection_dim=16, layers=2).save_pretrained(tmp_path / "clip")
    clip = ClipImageEncoder(tmp_path / "clip")
    ref, m = _patch_image((200, 10, 10), seed=4)
    other, _ = _patch_image((10, 10, 200), seed=5)
    emb = clip.embed([ref, other])
    assert emb.shape == (2, 16)
    same = attribute_similarity([ref], [m], ref, m, clip=clip)
    diff = attribute_similarity([other], [m], ref, m, clip=clip)
    assert same["attr_clip_sim"] == pytest.approx(1.0, abs=1e-6)
    assert diff["attr_clip_sim"] < same["attr_clip_sim"]
    with pytest.raises(FileNotFoundError):
        ClipImageEncoder(tmp_path / "missing")
