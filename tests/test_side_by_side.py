"""Side-by-side evaluation videos: every frame, written and read back as MP4."""

from __future__ import annotations

import numpy as np
import pytest

from durian.data.clip_codec import Clip
from durian.evaluation.cases import self_transfer_case
from durian.evaluation.side_by_side import preview_row, side_by_side_frames
from preprocessing.video import read_frames, write_video
from synthetic import random_attributes, random_identity, random_motion, render_video


def _case(frames: int = 4):
    rng = np.random.default_rng(0)
    identity, attributes = random_identity(rng), random_attributes(rng, {"hair": 1.0})
    images, labels, landmarks = render_video(identity, attributes, random_motion(rng, 8), 64)
    clip = Clip(images, labels, landmarks.astype(np.float32), {})
    return self_transfer_case(clip, "k", num_frames=frames)


def test_every_frame_is_portrait_attribute_driving_output_target():
    case = _case()
    output = np.random.default_rng(1).integers(0, 255, case.target.shape, dtype=np.uint8)
    video = side_by_side_frames(case, output)
    f, h, w = case.target.shape[:3]
    assert video.shape == (f, h, 5 * w, 3) and video.dtype == np.uint8
    assert np.array_equal(video[0], preview_row(case, output))  # the preview is frame 0
    for i in range(f):
        tiles = np.split(video[i], 5, axis=1)
        assert np.array_equal(tiles[2], case.keypoints[i])
        assert np.array_equal(tiles[3], output[i])
        assert np.array_equal(tiles[4], case.target[i])
        assert np.array_equal(tiles[0], video[0][:, :w])  # the references stay still


def test_output_at_another_resolution_sets_the_tile_size():
    case = _case(frames=3)
    output = np.zeros((3, 32, 32, 3), np.uint8)
    assert side_by_side_frames(case, output).shape == (3, 32, 160, 3)
    with pytest.raises(ValueError, match="differ"):
        side_by_side_frames(case, output[:2])


def test_written_as_an_mp4_with_all_frames(tmp_path):
    case = _case()
    video = side_by_side_frames(case, case.target)
    path = write_video(tmp_path / "case.mp4", video, fps=12)
    frames, _ = read_frames(path)
    assert frames.shape == video.shape
    assert np.abs(frames.astype(int) - video).mean() < 12  # lossy H.264, same content
