"""Fréchet distance, LPIPS and the weight-folder loaders, on hand-computable cases and on tiny
TorchScript / state-dict models saved the way the real weights are."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from metric_models import TinyInception, write_metric_weights

from durian.evaluation.perceptual import (
    FID_FILE,
    FVD_FILE,
    LPIPSBackbone,
    find_weights,
    frechet_distance,
    frechet_distance_of,
    i3d_features,
    inception_features,
    load_perceptual,
    lpips_from_features,
)


def test_frechet_identical_sets_are_zero():
    f = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance_of(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_of_known_gaussians_by_hand():
    # diagonal covariances: FD = |mu1 - mu2|² + Σ (√a - √b)²
    mu1, mu2 = np.array([0.0, 0.0]), np.array([3.0, 4.0])
    s1, s2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(25 + (2 - 1) ** 2 + (1 - 3) ** 2)
    # equal covariances: only the means count
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(25.0)


def test_frechet_of_shifted_features_is_the_squared_shift():
    f = np.random.default_rng(1).normal(size=(40, 5))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert frechet_distance_of(f, f + shift) == pytest.approx((shift**2).sum(), rel=1e-6)


def test_frechet_of_samples_from_known_gaussians():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal([1.0, 0.0, 0.0], 2.0, size=(20000, 3))
    # |m|² + 3 (1 - 2)² = 1 + 3
    assert frechet_distance_of(a, b) == pytest.approx(4.0, abs=0.1)


def test_frechet_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_of(np.zeros((1, 3)), np.zeros((5, 3)))


def test_lpips_from_features_by_hand():
    # layer 1: unit vectors (1,0) vs (0,1) -> squared differences (1,1); weights (0.5, 0.25)
    a1 = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    b1 = torch.tensor([0.0, 1.0]).reshape(1, 2, 1, 1)
    # layer 2: 2 pixels; (3,4) and (6,8) have the same direction (0 after normalising), the
    # other pixel differs like layer 1 -> spatial mean 0.5 * (w·(1,1)) = 0.5
    a2 = torch.tensor([[3.0, 1.0], [4.0, 0.0]]).reshape(1, 2, 2, 1)
    b2 = torch.tensor([[6.0, 0.0], [8.0, 1.0]]).reshape(1, 2, 2, 1)
    w = [torch.tensor([0.5, 0.25]), torch.tensor([0.5, 0.5]).reshape(1, 2, 1, 1)]
    d = lpips_from_features([a1, a2], [b1, b2], w)
    assert d.shape == (1,) and d.item() == pytest.approx(0.75 + 0.5)
    assert lpips_from_features([a1, a2], [a1, a2], w).item() == 0.0


def test_backbones_have_torchvision_layouts():
    alex = LPIPSBackbone("alex")
    shapes = {k: tuple(v.shape) for k, v in alex.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "features.0.weight": (64, 3, 11, 11),
        "features.3.weight": (192, 64, 5, 5),
        "features.6.weight": (384, 192, 3, 3),
        "features.8.weight": (256, 384, 3, 3),
        "features.10.weight": (256, 256, 3, 3),
    }
    assert alex.channels == [64, 192, 384, 256, 256]
    vgg = LPIPSBackbone("vgg")
    convs = [k for k in vgg.state_dict() if k.endswith("weight")]
    assert [int(k.split(".")[1]) for k in convs] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert vgg.channels == [64, 128, 256, 512, 512]
    taps = vgg(torch.zeros(1, 3, 64, 64))
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512]
    assert [t.shape[-1] for t in taps] == [64, 32, 16, 8, 4]


def _frames(seed: int, n: int = 4, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metric_weights")
    write_metric_weights(folder)
    return folder


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_find_weights_says_why_each_metric_is_skipped(tmp_path):
    found, skipped = find_weights(None)
    assert not found and set(skipped) == {"lpips", "fid", "fvd"}
    assert "metric_weights" in skipped["fid"]
    found, skipped = find_weights(tmp_path / "nowhere")
    assert "does not exist" in skipped["lpips"]
    torch.jit.script(TinyInception()).save(str(tmp_path / FID_FILE))
    found, skipped = find_weights(tmp_path)
    assert set(found) == {"fid"} and set(skipped) == {"lpips", "fvd"}
    assert FVD_FILE in skipped["fvd"] and "lpips_alex.pth" in skipped["lpips"]


def test_a_file_that_does_not_load_skips_its_metric(tmp_path):
    (tmp_path / FID_FILE).write_bytes(b"not a torchscript archive")
    models = load_perceptual(tmp_path)
    assert models.inception is None and "could not load" in models.skipped["fid"]


def test_loaders_read_the_weights_folder(weights):
    models = load_perceptual(weights)
    assert models.skipped == {}
    assert models.lpips is not None and models.inception is not None and models.i3d is not None


def test_fid_of_identical_and_shifted_frames(weights):
    model = load_perceptual(weights).inception
    a = _frames(0, n=6)
    fa = inception_features(model, a)
    assert fa.shape == (6, 3)
    assert frechet_distance_of(fa, inception_features(model, a.copy())) == pytest.approx(
        0, abs=1e-6
    )
    # +20 grey levels on every channel shifts every mean feature by 20: FD = 3 * 20²
    shifted = inception_features(model, a + 20)
    assert frechet_distance_of(fa, shifted) == pytest.approx(1200.0, rel=1e-4)


def test_fvd_of_identical_and_shifted_videos(weights):
    model = load_perceptual(weights).i3d
    videos = [_frames(s, n=5, size=40) for s in range(3)]
    f = i3d_features(model, videos)
    assert f.shape == (3, 3)
    assert frechet_distance_of(f, i3d_features(model, videos)) == pytest.approx(0, abs=1e-9)
    # +20 grey levels = +40/255 in [-1, 1] units on every channel
    g = i3d_features(model, [v + 20 for v in videos])
    assert frechet_distance_of(f, g) == pytest.approx(3 * (40 / 255) ** 2, rel=1e-4)


def test_lpips_is_zero_for_identical_frames_and_grows_with_noise(weights):
    lpips = load_perceptual(weights).lpips
    a = _frames(1, n=2, size=64)
    rng = np.random.default_rng(3)
    small = np.clip(a + rng.normal(0, 5, a.shape), 0, 255).astype(np.uint8)
    large = np.clip(a + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8)
    assert np.allclose(lpips.distance(a, a), 0.0)
    d_small, d_large = lpips.distance(a, small), lpips.distance(a, large)
    assert d_small.shape == (2,) and (d_small > 0).all()
    assert (d_large > d_small).all()
    assert np.allclose(lpips.distance(large, a), d_large)  # symmetric
    assert all(math.isfinite(v) for v in d_large)


def test_lpips_linear_layers_must_match_the_backbone(tmp_path):
    write_metric_weights(tmp_path)
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1)}, tmp_path / "lpips_alex.pth")
    models = load_perceptual(tmp_path)
    assert models.lpips is None and "lin1.model.1.weight" in models.skipped["lpips"]
