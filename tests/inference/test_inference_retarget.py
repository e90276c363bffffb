"""Retargeting keeps the portrait's face shape and carries the driver's motion; presets move
the portrait's own landmarks."""

from __future__ import annotations

import numpy as np
import pytest
from inference_helpers import astronaut, eye_face_ratios, grace_hopper, moving_face_video

from durian.inference.presets import PRESETS, open_mouth, preset_landmarks
from durian.inference.retarget import extend_to_length, retarget_landmarks


@pytest.fixture(scope="module")
def faces() -> dict[str, np.ndarray]:
    from preprocessing.faces import FaceAnalyzer

    with FaceAnalyzer() as fa:
        return {
            "astronaut": fa.landmarks(astronaut()[None], 1.0)[0][0],
            "grace": fa.landmarks(grace_hopper()[None], 1.0)[0][0],
        }


def similarity(points: np.ndarray, angle_deg: float, scale: float, shift) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    out = points.copy()
    centre = points[:, :2].mean(0)
    out[:, :2] = (points[:, :2] - centre) @ rot.T + centre + np.asarray(shift)
    out[:, 2] = points[:, 2] * scale
    return out


def eye_angle(lm: np.ndarray) -> float:
    d = lm[263, :2] - lm[33, :2]
    return float(np.degrees(np.arctan2(d[1], d[0])))


def test_retarget_keeps_portrait_shape_and_carries_head_motion(faces) -> None:
    portrait = faces["astronaut"]
    # A driver with a clearly different face (30 % wider) that turns, zooms and moves.
    wide = faces["grace"].copy()
    wide[:, 0] = wide[:, 0].mean() + 1.3 * (wide[:, 0] - wide[:, 0].mean())
    motions = [(0, 1.0, (0, 0)), (10, 1.1, (20, -5)), (-15, 0.9, (-30, 10)), (5, 1.2, (0, 40))]
    driver = np.stack([similarity(wide, *m) for m in motions])
    out = retarget_landmarks(driver, portrait)

    assert out.shape == (4, 478, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :2], portrait[:, :2], atol=1e-3)
    shape_p, shape_d, shape_out = (
        eye_face_ratios(portrait), eye_face_ratios(driver[0]), eye_face_ratios(out)
    )  # fmt: skip
    assert np.abs(shape_p - shape_d).max() > 0.05  # the driver's shape really differs
    np.testing.assert_allclose(shape_out, np.broadcast_to(shape_p, shape_out.shape), atol=1e-4)
    # The head motion carries over: same relative rotation and zoom as the driver.
    for t, (angle, scale, _) in enumerate(motions):
        assert eye_angle(out[t]) - eye_angle(out[0]) == pytest.approx(angle, abs=0.05)
        span = lambda lm: np.linalg.norm(lm[152, :2] - lm[10, :2])  # noqa: E731
        size = span(out[t]) / span(out[0])
        assert size == pytest.approx(scale, rel=1e-3)


def test_retarget_transfers_expression_scaled_to_the_portrait(faces) -> None:
    portrait, driver0 = faces["astronaut"], faces["grace"]
    driver = open_mouth(driver0, np.array([0.0, 1.0]))
    out = retarget_landmarks(driver, portrait)
    gap = lambda lm: np.linalg.norm(lm[14, :2] - lm[13, :2])  # noqa: E731  inner lips
    chin = lambda lm: np.linalg.norm(lm[152, :2] - lm[10, :2])  # noqa: E731  face height
    # The mouth opens by the same fraction of the face height as the driver's does.
    driver_open = (gap(driver[1]) - gap(driver[0])) / chin(driver[0])
    out_open = (gap(out[1]) - gap(out[0])) / chin(out[0])
    assert driver_open > 0.03
    assert out_open == pytest.approx(driver_open, rel=0.1)
    # Above the mouth nothing moves (no head motion in this driver).
    np.testing.assert_allclose(out[1, [33, 263, 10, 1], :2], portrait[[33, 263, 10, 1], :2],
                               atol=1e-3)  # fmt: skip


def test_retarget_real_driving_video_onto_another_face(tmp_path, faces) -> None:
    """Detected landmarks of a moving Grace Hopper drive the astronaut: her shape stays."""
    from durian.inference.prepare import Preparer

    video = moving_face_video(tmp_path / "drive.mp4", grace_hopper(), num_frames=6)
    with Preparer(64) as prep:
        drive = prep.driving_video(video)
        face = prep.face(astronaut())
    assert drive.landmarks.shape == (6, 478, 3) and drive.crops.shape == (6, 64, 64, 3)
    out = retarget_landmarks(drive.landmarks, face.landmarks)
    ratios = eye_face_ratios(out)
    own, driver = eye_face_ratios(face.landmarks), eye_face_ratios(drive.landmarks[0])
    assert np.abs(ratios - own).max() < 0.25 * np.abs(own - driver).max() + 0.01
    # The driver's in-plane rotation (±8°) shows up in the retargeted eye line.
    angles = np.array([eye_angle(o) - eye_angle(out[0]) for o in out])
    drv = np.array([eye_angle(d) - eye_angle(drive.landmarks[0]) for d in drive.landmarks])
    np.testing.assert_allclose(angles, drv, atol=1.0)
    assert np.abs(drv).max() > 4


def test_extend_to_length_plays_back_and_forth() -> None:
    seq = np.arange(4)
    assert extend_to_length(seq, 3).tolist() == [0, 1, 2]
    assert extend_to_length(seq, 9).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert extend_to_length(seq[:1], 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_move_the_portraits_own_face(faces, name) -> None:
    neutral = faces["astronaut"]
    seq = preset_landmarks(name, neutral, 24, 12.0)
    assert seq.shape == (24, 478, 3)
    np.testing.assert_allclose(seq[0], neutral, atol=1e-3)
    motion = np.abs(seq - neutral).max()
    if name == "still":
        assert motion < 1e-3
        return
    assert motion > 3.0  # pixels on a ~110 px face
    # Eye distance / face width stays the portrait's (turning foreshortens a little); face
    # height is left out: nodding and an opening jaw change it, as they should.
    ratios = eye_face_ratios(seq)[:, 0]
    tol = 0.05 if name == "turn" else 0.01
    assert np.abs(ratios - eye_face_ratios(neutral)[0]).max() < tol
    if name == "talk":
        gaps = np.linalg.norm(seq[:, 14, :2] - seq[:, 13, :2], axis=-1)
        assert gaps.max() > gaps[0] + 5


def test_unknown_preset_is_named() -> None:
    with pytest.raises(KeyError, match="unknown motion preset 'dance'"):
        preset_landmarks("dance", np.zeros((478, 3)), 2, 12.0)
