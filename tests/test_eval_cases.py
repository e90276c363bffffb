import numpy as np

from durian.data.clip import Clip
from durian.evaluation.cases import case_metrics, self_transfer_case
from preprocessing.synthetic import random_attributes, random_identity, random_motion, render_video
from preprocessing.synthetic.eval_cases import cross_identity_cases


def _clip(seed: int = 0, frames: int = 8) -> Clip:
    rng = np.random.default_rng(seed)
    identity, attributes = random_identity(rng), random_attributes(rng, {"hair": 1.0})
    images, labels, landmarks = render_video(identity, attributes, random_motion(rng, frames), 64)
    return Clip(images, labels, landmarks.astype(np.float32), {})


def test_self_transfer_case_masks_follow_the_category():
    case = self_transfer_case(_clip(), "k", num_frames=3)
    assert case is not None and case.category == "hair"
    assert case.attribute_mask.any() and case.portrait_mask.any()
    assert case.keypoints.shape == case.target.shape == (3, 64, 64, 3)
    # the attribute reference's region is hair, and hair is inside the portrait's removed region
    assert case.target_attribute_mask.any(axis=(1, 2)).all()


def test_perfect_output_scores_perfectly_and_noise_does_not():
    case = self_transfer_case(_clip(1), "k", num_frames=3)
    perfect = case_metrics(case, case.target)
    assert perfect["l1"] == 0 and perfect["ssim_attr"] > 0.999
    noise = np.random.default_rng(0).integers(0, 255, case.target.shape, dtype=np.uint8)
    assert case_metrics(case, noise)["psnr_attr"] < 15


def test_cross_identity_cases_are_cropped_and_exact():
    cases = cross_identity_cases(4, size=64, margin=0.6, seed=0, n_frames=4, source_size=96)
    assert [c.category for c in cases] == ["hair", "glasses", "hat", "beard"]
    for c in cases:
        assert c.portrait.shape == (64, 64, 3) and c.target.shape[1:] == (64, 64, 3)
        assert c.attribute_mask.any(), c.key
        assert c.target_attribute_mask.any(), c.key


def test_motion_error_is_zero_on_the_driving_landmarks_and_scales_with_output_size():
    from durian.evaluation.cases import motion_error

    case = self_transfer_case(_clip(2), "k", num_frames=3)
    assert motion_error(case, case.driving_landmarks, 64) == 0.0
    # the same face at twice the resolution: still zero once scaled
    assert motion_error(case, case.driving_landmarks * 2, 128) == 0.0
    shifted = case.driving_landmarks.copy()
    shifted[..., 0] += 1.0
    assert 0 < motion_error(case, shifted, 64) < 1
