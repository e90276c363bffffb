import cv2
import numpy as np
import pytest

from durian.data.augment import AffineParams, apply_affine, color_jitter, random_affine_params


def _shape_image(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An image that is non-zero exactly on its mask."""
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2 - 4), (12, 8), 30, 0, 360, 1, -1)
    mask[30:40, 10:16] = 1
    rng = np.random.default_rng(0)
    image = rng.integers(30, 256, (size, size, 3), dtype=np.uint8) * mask[..., None]
    return image, mask.astype(bool)


def test_identity_params_leave_image_and_mask_unchanged() -> None:
    image, mask = _shape_image()
    out, out_mask = apply_affine(image, mask, AffineParams())
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out_mask, mask)
    assert out_mask.dtype == bool


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_stays_aligned_with_image(seed: int) -> None:
    image, mask = _shape_image()
    params = random_affine_params(np.random.default_rng(seed), 0.1, 0.2, 30.0)
    out, out_mask = apply_affine(image, mask, params, fill="constant",
                                 interpolation=cv2.INTER_NEAREST)  # fmt: skip
    np.testing.assert_array_equal(out.any(-1), out_mask)  # exact with nearest for both
    out, out_mask = apply_affine(image, mask, params, fill="constant")
    visible = out.any(-1)
    kernel = np.ones((3, 3), np.uint8)
    inner = cv2.erode(out_mask.astype(np.uint8), kernel).astype(bool)
    near = cv2.dilate(out_mask.astype(np.uint8), kernel).astype(bool)
    # Bilinear only blurs the border by a pixel: the mask interior is image, the image is mask.
    assert visible[inner].all() and not visible[~near].any()
    assert out_mask.sum() > 0.7 * mask.sum()


def test_exposed_area_is_inpainted_and_outside_the_mask() -> None:
    image = np.full((32, 32, 3), 120, np.uint8)
    mask = np.ones((32, 32), bool)
    params = AffineParams(tx=0.25)  # shift right by 8 px: the left strip is new area
    out, out_mask = apply_affine(image, mask, params, fill="inpaint")
    assert not out_mask[:, :8].any() and out_mask[:, 8:].all()
    assert np.abs(out.astype(int) - 120).max() <= 5  # filled from the surroundings, not black
    black, _ = apply_affine(image, mask, params, fill="constant")
    assert not black[:, :8].any()
    marked, _ = apply_affine(
        image, None, params, fill=lambda im, ex: np.where(ex[..., None], 7, im)
    )
    assert (marked[:, :8] == 7).all() and (marked[:, 8:] == 120).all()


def test_random_affine_params_ranges_and_determinism() -> None:
    draws = [random_affine_params(np.random.default_rng(s), 0.05, 0.1, 10.0) for s in range(50)]
    assert all(abs(p.angle) <= 10 and abs(p.scale - 1) <= 0.1 for p in draws)
    assert all(abs(p.tx) <= 0.05 and abs(p.ty) <= 0.05 for p in draws)
    assert random_affine_params(np.random.default_rng(9)) == random_affine_params(
        np.random.default_rng(9)
    )
    assert len({p.angle for p in draws}) == 50


def test_color_jitter_determinism_and_neutral_settings() -> None:
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = color_jitter(image, np.random.default_rng(5))
    b = color_jitter(image, np.random.default_rng(5))
    c = color_jitter(image, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == image.shape and not np.array_equal(a, c)
    same = color_jitter(image, np.random.default_rng(5), 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(same, image)
    gray = np.full((8, 8, 3), 100, np.uint8)  # no hue or saturation to change
    np.testing.assert_array_equal(
        color_jitter(gray, np.random.default_rng(0), 0, 0, 0.5, 0.1), gray
    )
