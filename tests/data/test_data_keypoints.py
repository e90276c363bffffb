import numpy as np
from data_synth import template_landmarks

from durian.data.keypoints import (
    PART_COLORS,
    part_connections,
    render_keypoint_sequence,
    render_keypoints,
)


def test_connections_come_from_mediapipe_topology() -> None:
    conns = part_connections()
    assert set(conns) == set(PART_COLORS)
    assert len(conns["left_iris"]) == 4 and len(conns["face_oval"]) == 36
    used = np.unique(np.concatenate(list(conns.values())))
    assert used.min() >= 0 and used.max() == 477  # irises are the last ten landmarks
    assert len(set(PART_COLORS.values())) == len(PART_COLORS)  # a distinct colour per part


def test_render_draws_within_landmark_box_in_part_colours() -> None:
    lms = template_landmarks(64, seed=0)
    img = render_keypoints(lms, (64, 64))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    ys, xs = np.nonzero(img.any(-1))
    assert len(xs) > 100
    lo, hi = lms[:, :2].min(0), lms[:, :2].max(0)
    assert xs.min() >= lo[0] - 2 and xs.max() <= hi[0] + 2
    assert ys.min() >= lo[1] - 2 and ys.max() <= hi[1] + 2
    thick = render_keypoints(lms, (64, 64), thickness=2)
    colours = {tuple(c) for c in thick.reshape(-1, 3)}
    assert sum(c in colours for c in PART_COLORS.values()) >= 5  # full-intensity line cores


def test_render_moves_with_landmarks() -> None:
    lms = template_landmarks(64, seed=1) * 0.5 + 16
    base = render_keypoints(lms, (64, 64))
    moved = render_keypoints(lms + np.array([7.0, -5.0, 0.0]), (64, 64))
    np.testing.assert_array_equal(moved[5 + 0 : 64, 7:], np.roll(base, (-5, 7), (0, 1))[5:, 7:])
    assert not np.array_equal(moved, base)


def test_render_handles_off_canvas_and_missing_landmarks() -> None:
    lms = template_landmarks(32, seed=2)
    lms[:, 0] += 1e6  # far off canvas: must not crash or draw
    assert not render_keypoints(lms, (32, 32)).any()
    assert not render_keypoints(np.full((478, 3), np.nan), (32, 32)).any()


def test_render_sequence_and_non_square() -> None:
    seq = np.stack([template_landmarks(48, s) for s in range(3)])
    out = render_keypoint_sequence(seq, (40, 48), thickness=2)
    assert out.shape == (3, 40, 48, 3)
    np.testing.assert_array_equal(out[1], render_keypoints(seq[1], (40, 48), thickness=2))
