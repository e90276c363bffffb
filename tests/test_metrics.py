import math

import numpy as np
import pytest

from durian.evaluation.metrics import l1, psnr, region_metrics, ssim


def _image(seed: int = 0, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_identical_inputs():
    a = _image()
    assert l1(a, a) == 0.0
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)


def test_known_shift_by_hand():
    a = np.zeros((8, 8, 3), np.float32)
    b = a + 0.1
    assert l1(a, b) == pytest.approx(0.1)
    # MSE = 0.01 -> PSNR = 10*log10(1/0.01) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0)


def test_region_only_counts_masked_pixels():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[:4] = 255  # differ only in the top half
    top = np.zeros((8, 8), bool)
    top[:4] = True
    assert l1(a, b, top) == pytest.approx(1.0)
    assert l1(a, b, ~top) == 0.0
    assert l1(a, b) == pytest.approx(0.5)


def test_empty_region_is_missing_not_a_number():
    a = _image()
    empty = np.zeros(a.shape[:2], bool)
    assert all(math.isnan(v) for v in region_metrics(a, a, {"attr": empty}).values())


def test_noise_lowers_ssim_and_psnr_monotonically():
    a = _image(1).astype(np.float64) / 255
    rng = np.random.default_rng(2)
    small = np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1)
    large = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert ssim(a, small) > ssim(a, large)
    assert psnr(a, small) > psnr(a, large)


def test_mask_shape_mismatch_is_an_error():
    a = _image()
    with pytest.raises(ValueError, match="mask"):
        l1(a, a, np.ones((3, 3), bool))


def test_flicker_is_zero_for_the_same_motion_and_grows_with_flicker():
    from durian.evaluation.metrics import temporal_flicker

    rng = np.random.default_rng(0)
    target = rng.uniform(0, 1, (5, 8, 8, 3))
    assert temporal_flicker(target + 0.1, target) == pytest.approx(0.0)  # constant offset
    flicker = target.copy()
    flicker[1::2] += 0.2
    # every frame-to-frame change is off by exactly 0.2
    assert temporal_flicker(flicker, target) == pytest.approx(0.2)
    assert math.isnan(temporal_flicker(target[:1], target[:1]))


def test_landmark_distance_by_hand_and_missing_frames():
    from durian.evaluation.metrics import landmark_distance

    target = np.zeros((2, 3, 2))
    pred = target.copy()
    pred[..., 0] += 3.0
    pred[..., 1] += 4.0  # every point 5 px away
    assert landmark_distance(pred, target) == pytest.approx(5.0)
    assert landmark_distance(pred, target, normaliser=np.array([10.0, 10.0])) == pytest.approx(0.5)
    pred[1] = np.nan  # a frame where no face was found
    assert landmark_distance(pred, target) == pytest.approx(5.0)
    assert math.isnan(landmark_distance(np.full_like(target, np.nan), target))
