"""The sample data set: readable MP4s, aligned ground-truth sidecars, determinism."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from preprocessing.labels import CLASS, LABELS
from synthetic import load_transfer_cases
from synthetic.sample import (
    cross_identity_eval_set,
    generate_sample,
    real_clip,
    sidecar_path,
    synthetic_clip,
)

N_FRAMES, SIZE = 6, 64


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    paths = generate_sample(out, n_synthetic=2, n_frames=N_FRAMES, size=SIZE, fps=10, seed=3)
    return out, paths


def test_sample_writes_readable_videos_with_matching_sidecars(sample_dir):
    out, paths = sample_dir
    names = [p.name for p in paths]
    assert names == ["real_astronaut.mp4", "real_grace_hopper.mp4", "synth_000.mp4",
                     "synth_001.mp4"]
    for path in paths:
        frames = _decode(path)
        assert frames.shape[0] == N_FRAMES and frames.shape[1] == SIZE
        assert frames.std() > 10
        if path.name.startswith("real_"):
            assert frames.shape[2] == SIZE * 3 // 4
            assert not sidecar_path(path).exists()
            # The photo moves: frames are not all the same.
            assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1
            continue
        assert frames.shape[2] == SIZE
        with np.load(sidecar_path(path)) as gt:
            landmarks, parsing = gt["landmarks"], gt["parsing"]
            assert list(gt["classes"]) == list(LABELS)
            meta = json.loads(str(gt["meta"]))
        assert landmarks.shape == (N_FRAMES, 478, 3) and landmarks.dtype == np.float32
        assert parsing.shape == (N_FRAMES, SIZE, SIZE) and parsing.dtype == np.uint8
        assert meta["generator"] == "synthetic"
        # Aligned frame for frame: the face (per the sidecar) is where the video's
        # non-background pixels differ most from the background's colour.
        for t in range(N_FRAMES):
            x, y = landmarks[t, 1, :2]  # nose tip
            assert 0 <= x < SIZE and 0 <= y < SIZE
            assert parsing[t, int(y), int(x)] in (CLASS["nose"], CLASS["skin"])
        skin = parsing == CLASS["skin"]
        background = parsing == CLASS["background"]
        skin_color = frames[skin].mean(0)
        # The decoded skin pixels are close to one colour; background pixels are not that.
        assert np.abs(frames[skin] - skin_color).mean() < 25
        assert np.abs(frames[background] - skin_color).mean() > np.abs(
            frames[skin] - skin_color).mean()


def test_sample_is_deterministic(sample_dir, tmp_path):
    # What goes into the encoder is bit-exact under the seed...
    for name in ("astronaut", "grace_hopper"):
        np.testing.assert_array_equal(real_clip(name, N_FRAMES, SIZE, 3),
                                      real_clip(name, N_FRAMES, SIZE, 3))
    clip, clip_again = synthetic_clip(1, N_FRAMES, SIZE, 3), synthetic_clip(1, N_FRAMES, SIZE, 3)
    for x, y in zip(clip[:3], clip_again[:3], strict=True):
        np.testing.assert_array_equal(x, y)
    assert clip[3] == clip_again[3]
    # ...and so are the sidecars; each decoded video is its exact source up to H.264 loss
    # (libx264 with frame threads is not bit-exact from run to run, so bytes may differ).
    out, paths = sample_dir
    again = generate_sample(tmp_path, n_synthetic=2, n_frames=N_FRAMES, size=SIZE, fps=10,
                            seed=3)
    sources = [real_clip("astronaut", N_FRAMES, SIZE, 3),
               real_clip("grace_hopper", N_FRAMES, SIZE, 3),
               synthetic_clip(0, N_FRAMES, SIZE, 3)[0], clip[0]]
    for a, b, source in zip(paths, again, sources, strict=True):
        for video in (a, b):
            assert np.abs(_decode(video).astype(int) - source).mean() < 10
        if sidecar_path(a).exists():
            with np.load(sidecar_path(a)) as ga, np.load(sidecar_path(b)) as gb:
                np.testing.assert_array_equal(ga["parsing"], gb["parsing"])
                np.testing.assert_array_equal(ga["landmarks"], gb["landmarks"])
    other = generate_sample(tmp_path / "other", n_synthetic=1, n_frames=N_FRAMES, size=SIZE,
                            fps=10, seed=4, real_photos=False)
    assert [p.name for p in other] == ["synth_000.mp4"]
    assert np.abs(_decode(other[0]).astype(int) - _decode(paths[2]).astype(int)).mean() > 10
    # Nothing left behind from the atomic writes.
    assert not [p for p in tmp_path.rglob(".*")]


def test_sample_rejects_sizes_h264_would_crop(tmp_path):
    with pytest.raises(ValueError, match="even"):
        generate_sample(tmp_path, n_synthetic=1, n_frames=2, size=63, fps=10, seed=0)


def test_cross_identity_eval_set(tmp_path):
    index = cross_identity_eval_set(tmp_path / "xid", n=2, n_frames=2, size=48, seed=0)
    assert index.exists()
    cases = load_transfer_cases(index.parent)
    assert [c.category for c in cases] == ["hair", "glasses"]
    assert cases[0].target_frames.shape == (2, 48, 48, 3)
