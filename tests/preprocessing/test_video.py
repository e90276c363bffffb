"""Probe, decode, resample and hash real (tiny) videos written with PyAV."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from prep_media import damage, level_frames, make_audio_only, make_video, noise_video

from preprocessing.video import (
    VideoError,
    content_hash,
    probe_video,
    read_frames,
    resampled_num_frames,
    write_video,
)

LEVELS = 10 + 20 * np.arange(12)


def levels_of(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("media")
    return {
        "cfr": make_video(d / "cfr.mp4", level_frames(10), fps=10),
        "gop": noise_video(d / "gop.mp4", n=30, gop=5),
    }


def test_probe_constant_rate(media: dict[str, Path]) -> None:
    info = probe_video(media["cfr"])
    assert (info.width, info.height, info.num_frames) == (64, 48, 10)
    assert info.fps == pytest.approx(10.0)
    assert info.duration == pytest.approx(1.0)
    assert info.rotation == 0
    assert info.codec == "h264"
    assert not info.variable_frame_rate


def test_read_native_rate(media: dict[str, Path]) -> None:
    frames, idx = read_frames(media["cfr"])
    assert frames.shape == (10, 48, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(idx, np.arange(10))
    np.testing.assert_allclose(levels_of(frames), LEVELS[:10], atol=3)


def test_resample_up_and_down(media: dict[str, Path], tmp_path: Path) -> None:
    # 10 → 25 fps: output k at k/25 s takes source round(0.4 k) (no ties for integer k); the
    # last output (0.96 s) lies in the last frame's interval and takes frame 9.
    frames, idx = read_frames(media["cfr"], fps=25)
    assert len(frames) == resampled_num_frames(1.0, 25) == 25
    expected = np.minimum(np.round(np.arange(25) * 0.4).astype(int), 9)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(levels_of(frames), LEVELS[idx], atol=3)
    # 30 → 10 fps keeps every third frame.
    src = make_video(tmp_path / "30.mp4", level_frames(12), fps=30)
    frames, idx = read_frames(src, fps=10)
    np.testing.assert_array_equal(idx, [0, 3, 6, 9])
    np.testing.assert_allclose(levels_of(frames), LEVELS[[0, 3, 6, 9]], atol=3)


def test_window_matches_full_decode_after_seek(media: dict[str, Path]) -> None:
    full, full_idx = read_frames(media["gop"], fps=25)
    assert len(full) == 75  # 30 frames at 10 fps = 3 s
    part, part_idx = read_frames(media["gop"], fps=25, start=60, count=10)
    np.testing.assert_array_equal(part_idx, full_idx[60:70])
    np.testing.assert_array_equal(part, full[60:70])  # decoded from a later keyframe
    tail, tail_idx = read_frames(media["gop"], start=27, count=10)  # clipped at the end
    np.testing.assert_array_equal(tail_idx, [27, 28, 29])
    empty, empty_idx = read_frames(media["gop"], start=30)
    assert empty.shape == (0, 48, 64, 3) and len(empty_idx) == 0


def test_variable_frame_rate(tmp_path: Path) -> None:
    pts = [0, 33, 66, 200, 233, 500, 533, 566, 900, 1000]
    path = make_video(tmp_path / "vfr.mp4", level_frames(10), fps=30, pts_ms=pts)
    info = probe_video(path)
    assert info.variable_frame_rate and info.num_frames == 10
    frames, idx = read_frames(path, fps=10)  # outputs at 0, 0.1, …, 0.9 s
    np.testing.assert_array_equal(idx, [0, 2, 3, 4, 5, 5, 7, 7, 8, 8])
    np.testing.assert_allclose(levels_of(frames), LEVELS[idx], atol=3)


@pytest.mark.parametrize(
    ("ccw", "cw", "corner"),
    [(-90, 90, (0, -1)), (180, 180, (-1, -1)), (90, 270, (-1, 0))],
)
def test_rotation_from_display_matrix(tmp_path: Path, ccw: int, cw: int, corner) -> None:
    frames = np.zeros((3, 32, 64, 3), np.uint8)
    frames[:, :8, :8] = 255  # a marker in the coded top-left corner
    path = make_video(tmp_path / "rot.mp4", frames, rotation=ccw)
    info = probe_video(path)
    assert info.rotation == cw
    out, _ = read_frames(path)
    h, w = (64, 32) if cw in (90, 270) else (32, 64)
    assert (info.height, info.width) == (h, w) and out.shape == (3, h, w, 3)
    # Clockwise 90°: top-left → top-right; 180°: → bottom-right; 270°: → bottom-left.
    assert out[0, corner[0], corner[1]].min() > 200
    assert out[0, 0, 0].max() < 50 or corner == (0, 0)


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    gray = np.full((3, 48, 64), 77, np.uint8)
    path = make_video(tmp_path / "gray.mkv", gray, codec="ffv1", pix_fmt="gray")
    frames, _ = read_frames(path)
    assert frames.shape == (3, 48, 64, 3)
    assert (frames == 77).all()


def test_high_resolution_downscaled(tmp_path: Path) -> None:
    frames = np.zeros((3, 2160, 3840, 3), np.uint8)
    frames[:, :, 1920:] = 255  # right half white
    path = make_video(tmp_path / "uhd.mp4", frames)
    info = probe_video(path)
    assert (info.width, info.height) == (3840, 2160)
    out, _ = read_frames(path, max_side=64)
    assert out.shape == (3, 36, 64, 3)
    assert out[:, :, :30].max() < 30 and out[:, :, 34:].min() > 225


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = noise_video(d / "good.mp4")
    front = noise_video(d / "front.mp4", options={"movflags": "faststart"})
    (d / "half.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (d / "half_front.mp4").write_bytes(front.read_bytes()[: front.stat().st_size // 2])
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n")
    png = make_video(d / "pic.png", level_frames(1), codec="png", pix_fmt="rgb24")
    shutil.copy(png, d / "pic.mp4")
    return {
        "corrupt": damage(good, d / "corrupt.mp4"),
        "truncated_moov_at_end": d / "half.mp4",
        "truncated_moov_at_front": d / "half_front.mp4",
        "empty": d / "empty.mp4",
        "text": d / "text.mp4",
        "picture": d / "pic.mp4",
        "audio": make_audio_only(d / "audio.mp4"),
        "missing": d / "nope.mp4",
    }


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated_moov_at_end", "unreadable"),
        ("truncated_moov_at_front", "truncated"),
        ("empty", "empty_file"),
        ("text", "not_a_video"),
        ("picture", "not_a_video"),
        ("audio", "audio_only"),
        ("missing", "not_found"),
    ],
)
def test_bad_inputs_have_reasons(bad: dict[str, Path], name: str, reason: str) -> None:
    with pytest.raises(VideoError) as probe_err:
        probe_video(bad[name])
    assert probe_err.value.reason == reason
    with pytest.raises(VideoError) as read_err:
        read_frames(bad[name])
    assert read_err.value.reason == reason


def test_corrupt_middle_found_by_full_decode(bad: dict[str, Path]) -> None:
    probe_video(bad["corrupt"])  # header and first frame are fine
    with pytest.raises(VideoError) as err:
        probe_video(bad["corrupt"], verify=True)
    assert err.value.reason == "corrupt"
    with pytest.raises(VideoError) as err:
        read_frames(bad["corrupt"])
    assert err.value.reason == "corrupt"


def test_content_hash(media: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copy(media["cfr"], tmp_path / "copy.mp4")
    h = content_hash(media["cfr"])
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == content_hash(copy, chunk_size=7)  # chunking does not matter
    assert h == hashlib.sha256(media["cfr"].read_bytes()).hexdigest()[:16]
    assert content_hash(media["gop"]) != h


def test_write_video_round_trip(tmp_path: Path) -> None:
    path = write_video(tmp_path / "out" / "w.mp4", level_frames(5, 33, 47), fps=10)
    frames, _ = read_frames(path)
    assert frames.shape == (5, 32, 46, 3)  # cropped to even sizes for H.264
    assert not list(path.parent.glob(".*"))  # no temporary left
