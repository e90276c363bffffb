import numpy as np

from durian.data.clip_codec import Clip
from durian.evaluation.cases import case_metrics, self_transfer_case
from flows.eval_cases import cross_identity_cases
from synthetic import random_attributes, random_identity, random_motion, render_video


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


def test_copy_paste_baseline_pastes_the_attribute_where_the_target_has_it():
    from dataclasses import replace

    from durian.evaluation.baselines import copy_paste_transfer

    case = cross_identity_cases(4, size=64, margin=0.6, seed=0, n_frames=4, source_size=96)[2]
    assert case.category == "hat"
    out = copy_paste_transfer(case)
    assert out.shape == case.target.shape and out.dtype == np.uint8
    portrait_only = np.repeat(case.portrait[None], len(case.target), axis=0)
    pasted, plain = case_metrics(case, out), case_metrics(case, portrait_only)
    assert pasted["psnr_attr"] > plain["psnr_attr"] + 3  # the hat is where the target has it
    # Nothing to move: with the driving landmarks equal to the portrait's, the portrait comes
    # back unchanged wherever no attribute pixel is pasted.
    still = replace(case, driving_landmarks=case.portrait_landmarks[None])
    frame = copy_paste_transfer(still)[0].astype(int)
    moved = cv2_warp_mask(case)
    assert moved.any()
    assert np.abs(frame - case.portrait.astype(int))[~moved].max() <= 1


def cv2_warp_mask(case) -> np.ndarray:
    """The attribute mask moved onto the portrait, dilated by 2 px (the paste is bilinear)."""
    import cv2

    from durian.data.masks import align_mask

    m = align_mask(case.attribute_mask, case.attribute_landmarks, case.portrait_landmarks, (64, 64))
    return cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
