"""Model files, face detection/landmarks, tracking and crops — on real faces shipped in packages."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
from skimage import data

from preprocessing import mp_models
from preprocessing.faces import (
    ClipRejected,
    FaceAnalyzer,
    _nms,
    crop_boxes,
    crop_frames,
    crop_labels,
    face_box,
    face_size,
    landmarks_to_crop,
    select_track,
    track_face,
)

REPO = Path(__file__).resolve().parents[2]
MODELS_OK = all(v == "ok" for v in mp_models.check().values())
needs_models = pytest.mark.skipif(
    not MODELS_OK,
    reason=f"mediapipe models missing in {mp_models.models_dir()}: "
    f"run `{mp_models.FETCH_COMMAND}` (the install step)",
)
NOSE_TIP = 1


def astronaut() -> np.ndarray:
    return data.astronaut()


def grace_hopper() -> np.ndarray:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.ascontiguousarray(matplotlib.image.imread(path)[..., :3])


def shifted(img: np.ndarray, shifts: list[tuple[float, float]]) -> np.ndarray:
    """A tiny 'video': the still translated by (dx, dy) per frame."""
    h, w = img.shape[:2]
    m = [np.float32([[1, 0, dx], [0, 1, dy]]) for dx, dy in shifts]
    return np.stack([cv2.warpAffine(img, mi, (w, h), borderMode=cv2.BORDER_REPLICATE) for mi in m])


@pytest.fixture(scope="module")
def analyzer():
    with FaceAnalyzer() as fa:
        yield fa


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "preprocessing.mp_models", *args],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


# --- model files ---------------------------------------------------------------------------


def test_models_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DURIAN_MODELS_DIR", str(tmp_path / "m"))
    assert mp_models.models_dir() == tmp_path / "m"
    monkeypatch.delenv("DURIAN_MODELS_DIR")
    assert mp_models.models_dir() == Path.home() / ".cache" / "durian" / "models"


def test_missing_or_corrupt_model_names_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m preprocessing.mp_models fetch"):
        mp_models.model_path("face_landmarker.task", tmp_path)
    (tmp_path / "face_landmarker.task").write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match="wrong sha256.*mp_models fetch"):
        mp_models.model_path("face_landmarker.task", tmp_path)
    res = run_cli("check", "--dest", str(tmp_path))
    assert res.returncode == 1
    assert "bad sha256" in res.stdout and "missing" in res.stdout
    assert mp_models.FETCH_COMMAND in res.stderr


@needs_models
def test_check_cli_finds_valid_models():
    res = run_cli("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == len(mp_models.MODELS)


@needs_models
def test_fetch_is_idempotent_and_offline_when_files_are_valid(tmp_path):
    for name in mp_models.MODELS:
        shutil.copy(mp_models.model_path(name), tmp_path / name)
    # With every index disabled any download would fail: success proves nothing was fetched.
    res = run_cli("fetch", "--dest", str(tmp_path), env={"PIP_NO_INDEX": "1"})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mp_models.MODELS)


# --- detection and landmarks ---------------------------------------------------------------


@needs_models
def test_landmarks_follow_a_moving_face(analyzer):
    shifts = [(0, 0), (6, 3), (12, 6), (18, 9), (24, 12)]
    per_frame = analyzer.landmarks(shifted(astronaut(), shifts), fps=25)
    assert [f.shape for f in per_frame] == [(1, 478, 3)] * len(shifts)
    nose = np.stack([f[0, NOSE_TIP, :2] for f in per_frame])
    # The face in astronaut.png: nose tip near (235, 130) of 512².
    assert np.allclose(nose[0], (235, 130), atol=25)
    moved = nose - nose[0]
    assert np.allclose(moved, np.array(shifts, np.float32), atol=2.0), moved


@needs_models
def test_blank_clip_is_rejected_as_no_face(analyzer):
    frames = np.full((4, 256, 256, 3), 127, np.uint8)
    with pytest.raises(ClipRejected) as err:
        select_track(analyzer.landmarks(frames, fps=25), min_face_size=32)
    assert err.value.reason == "no_face"


@needs_models
def test_two_people_side_by_side_are_rejected(analyzer):
    g = grace_hopper()
    g = cv2.resize(g, (round(512 * g.shape[1] / g.shape[0]), 512), interpolation=cv2.INTER_AREA)
    frames = np.stack([np.concatenate([astronaut(), g], axis=1)] * 3)
    per_frame = analyzer.landmarks(frames, fps=25)
    assert all(len(f) == 2 for f in per_frame)
    with pytest.raises(ClipRejected) as err:
        select_track(per_frame, min_face_size=32)
    assert err.value.reason == "multiple_faces"


@needs_models
def test_tiny_face_is_rejected_as_too_small(analyzer):
    canvas = np.full((512, 512, 3), 120, np.uint8)
    canvas[160:352, 160:352] = cv2.resize(astronaut(), (192, 192), interpolation=cv2.INTER_AREA)
    per_frame = analyzer.landmarks(np.stack([canvas] * 3), fps=25)
    assert all(len(f) == 1 for f in per_frame)  # found (the tiles see it), but small
    assert face_size(per_frame[0][0]) < 64
    with pytest.raises(ClipRejected) as err:
        select_track(per_frame, min_face_size=64)
    assert err.value.reason == "face_too_small"
    assert select_track(per_frame, min_face_size=16).shape == (3, 478, 3)


@needs_models
def test_tiles_run_only_where_a_face_that_counts_could_hide():
    """A face so large that half of it is within the whole frame's reach lets a keyframe skip
    its tiles: a face under half its size (never a second person) then goes unseen — and so
    do the tiles' false detections. Asking for smaller faces brings the tiles back."""
    img = astronaut()
    canvas = np.full((512, 672, 3), 120, np.uint8)
    canvas[:, :512] = cv2.resize(img[20:260, 118:358], (512, 512), interpolation=cv2.INTER_AREA)
    canvas[176:336, 512:672] = cv2.resize(img, (160, 160), interpolation=cv2.INTER_AREA)
    small_centre = np.array([582.0, 212.0])  # the small astronaut's face, ~32 px

    def centres(boxes: np.ndarray) -> np.ndarray:
        return (boxes[:, :2] + boxes[:, 2:4]) / 2

    with FaceAnalyzer() as default, FaceAnalyzer(small_face_ratio=0.2) as thorough:
        big = default.detect(canvas)
        assert len(big) == 1 and big[0, 4] > 0.9, big
        assert 200 < big[0, 2] - big[0, 0] < 240 and np.all(centres(big)[0] < 512)
        both = thorough.detect(canvas)
        assert np.linalg.norm(centres(both) - small_centre, axis=1).min() < 10, both
        # The analyzer keeps its setting across processes.
        assert pickle.loads(pickle.dumps(thorough)).small_face_ratio == 0.2


@needs_models
def test_analyzer_pickles_to_a_fresh_usable_copy(analyzer):
    copy = pickle.loads(pickle.dumps(analyzer))
    assert copy is not analyzer and copy.num_faces == analyzer.num_faces
    assert len(copy.landmarks(astronaut()[None], fps=25)[0]) == 1
    copy.close()
    with pytest.raises(RuntimeError, match="closed"):
        copy.landmarks(astronaut()[None], fps=25)


@needs_models
def test_crop_centres_the_face_and_landmarks_match_redetection(analyzer):
    frames = shifted(astronaut(), [(0, 0), (8, 4), (16, 8), (24, 12)])
    track = select_track(analyzer.landmarks(frames, fps=25), min_face_size=64)
    boxes = crop_boxes(track, margin=0.5, smooth_window=3)
    side = boxes[:, 2] - boxes[:, 0]
    assert np.allclose(side, boxes[:, 3] - boxes[:, 1])
    crops = crop_frames(frames, boxes, 256)
    lms = landmarks_to_crop(track, boxes, 256)
    assert crops.shape == (4, 256, 256, 3) and lms.dtype == np.float32
    centre = (face_box(lms)[:, :2] + face_box(lms)[:, 2:]) / 2
    # Centred horizontally; lowered by the 0.1-face-size lift (hair room) vertically.
    assert np.all(np.abs(centre[:, 0] - 128) < 6), centre
    assert np.all((centre[:, 1] > 128) & (centre[:, 1] < 128 + 0.1 * 128 + 8)), centre
    redetected = np.stack([f[0] for f in analyzer.landmarks(crops, fps=25)])
    err = np.linalg.norm(redetected[..., :2] - lms[..., :2], axis=-1)
    assert np.median(err) < 2.0 and np.percentile(err, 95) < 5.0, (np.median(err), err.max())


# --- tracking and crop geometry without a detector ------------------------------------------


def fake_face(cx: float, cy: float, size: float, seed: int = 0) -> np.ndarray:
    """478 points filling a square of side ``size`` (only geometry matters to the tracker)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-size / 2, size / 2, (478, 3)).astype(np.float32)
    pts[:2, :2] = [[-size / 2, -size / 2], [size / 2, size / 2]]  # exact box corners
    pts[:, 0] += cx
    pts[:, 1] += cy
    return pts


def test_select_track_interpolates_gaps_and_ignores_small_bystanders():
    main = [fake_face(100 + 10 * i, 100, 80) for i in range(5)]
    bystander = fake_face(400, 300, 30, seed=1)  # 30 < 0.5 * 80: allowed
    per_frame = [np.stack([main[0], bystander]), main[1][None], np.zeros((0, 478, 3)),
                 np.stack([bystander, main[3]]), main[4][None]]  # fmt: skip
    track = select_track(per_frame, min_face_size=40, max_missing_fraction=0.25)
    assert np.allclose(track[2], (main[1] + main[3]) / 2, atol=1e-4)
    assert np.allclose(track[3], main[3])
    with pytest.raises(ClipRejected) as err:
        select_track(per_frame, min_face_size=40, max_missing_fraction=0.1)
    assert err.value.reason == "no_face"
    second = [np.stack([m, fake_face(400, 300, 60, seed=2)]) for m in main]
    with pytest.raises(ClipRejected) as err:
        select_track(second, min_face_size=40)
    assert err.value.reason == "multiple_faces"


def walk(t: int, size: float = 100, seed: int = 0) -> list[np.ndarray]:
    """The main face drifting right over ``t`` frames."""
    return [fake_face(200 + 4 * i, 200, size, seed=seed) for i in range(t)]


def with_extra(main: list[np.ndarray], extra: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Per-frame faces: the main face plus ``extra[i]`` in frame i (listed first, so order
    does not pick the main face)."""
    return [np.stack([extra[i], m]) if i in extra else m[None] for i, m in enumerate(main)]


def test_false_detection_in_one_frame_is_kept_and_its_frame_noted():
    # Issue 23: a face-like patch half the main face's size in one of 8 frames.
    main = walk(8)
    per_frame = with_extra(main, {3: fake_face(600, 450, 50, seed=9)})
    found = track_face(per_frame, min_face_size=32)
    assert found.stray_frames == (3,)
    assert np.array_equal(found.landmarks, np.stack(main))
    assert np.array_equal(select_track(per_frame, min_face_size=32), found.landmarks)
    # It does count as a second face (>= 0.5x): a rule strict enough rejects on it.
    with pytest.raises(ClipRejected) as err:
        track_face(per_frame, min_face_size=32, second_face_min_fraction=0.1)
    assert err.value.reason == "multiple_faces" and "1 of 8 frames" in err.value.detail


def test_second_person_throughout_is_rejected():
    main = walk(8)
    other = {i: fake_face(600 - 3 * i, 220, 70, seed=20 + i) for i in range(8)}
    with pytest.raises(ClipRejected) as err:
        track_face(with_extra(main, other), min_face_size=32)
    assert err.value.reason == "multiple_faces" and "8 of 8 frames" in err.value.detail
    # Also when the detector misses them in some frames (5 of 8 found >= half).
    patchy = {i: other[i] for i in (0, 1, 3, 4, 6)}
    with pytest.raises(ClipRejected):
        track_face(with_extra(main, patchy), min_face_size=32)


@pytest.mark.parametrize("fraction, rejected", [(0.5, False), (0.41, False), (0.4, True)])
def test_person_walking_through_some_frames_is_decided_by_the_params(fraction, rejected):
    # A passer-by in 4 of 10 frames (0.9x the main face), walking left across the frame.
    main = walk(10)
    passer = {i: fake_face(700 - 60 * i, 260, 90, seed=30 + i) for i in range(3, 7)}
    per_frame = with_extra(main, passer)
    if rejected:
        with pytest.raises(ClipRejected) as err:
            track_face(per_frame, min_face_size=32, second_face_min_fraction=fraction)
        assert err.value.reason == "multiple_faces" and "4 of 10 frames" in err.value.detail
    else:
        found = track_face(per_frame, min_face_size=32, second_face_min_fraction=fraction)
        assert found.stray_frames == (3, 4, 5, 6)
        assert np.array_equal(found.landmarks, np.stack(main))


def test_main_face_is_the_one_seen_throughout_not_a_larger_passer_by():
    # A passer-by close to the camera (1.5x the main face) in 3 of 10 frames: the main face
    # keeps the track (the largest single face would have seeded it on the passer-by).
    main = walk(10)
    passer = {i: fake_face(650 - 50 * i, 300, 150, seed=40 + i) for i in range(2, 5)}
    found = track_face(with_extra(main, passer), min_face_size=32)
    assert np.array_equal(found.landmarks, np.stack(main))
    assert found.stray_frames == (2, 3, 4)


def test_false_detections_that_jump_around_do_not_add_up_to_a_second_face():
    # 6 of 10 frames have one 0.6x detection, each somewhere else: no one face persists.
    main = walk(10)
    spots = [(620, 60), (80, 460), (640, 480), (60, 60), (400, 520), (700, 250)]
    frames = (0, 2, 4, 6, 8, 9)
    noise = {i: fake_face(x, y, 60, seed=50 + i) for i, (x, y) in zip(frames, spots, strict=True)}
    found = track_face(with_extra(main, noise), min_face_size=32)
    assert found.stray_frames == frames
    assert np.array_equal(found.landmarks, np.stack(main))


def test_small_background_face_throughout_is_kept_and_not_noted():
    main = walk(8)
    background = {i: fake_face(600, 400, 45, seed=60 + i) for i in range(8)}  # 0.45x
    found = track_face(with_extra(main, background), min_face_size=32)
    assert found.stray_frames == ()
    assert np.array_equal(found.landmarks, np.stack(main))
    # A stricter size ratio makes the same face a second person.
    with pytest.raises(ClipRejected) as err:
        track_face(with_extra(main, background), min_face_size=32, second_face_min_ratio=0.4)
    assert err.value.reason == "multiple_faces"


def test_a_single_image_is_rejected_for_any_second_face_that_counts():
    main = fake_face(200, 200, 100)
    with pytest.raises(ClipRejected) as err:
        track_face([np.stack([main, fake_face(450, 200, 55, seed=1)])], min_face_size=32)
    assert err.value.reason == "multiple_faces"
    assert track_face([np.stack([main, fake_face(450, 200, 45, seed=1)])], 32).stray_frames == ()


@pytest.mark.parametrize(
    "kwargs", [{"second_face_min_fraction": 0.0}, {"second_face_min_fraction": 1.5},
               {"second_face_min_ratio": 0.0}, {"second_face_min_ratio": -1.0}],
)  # fmt: skip
def test_track_face_names_a_bad_second_face_setting(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        track_face([fake_face(200, 200, 100)[None]], min_face_size=32, **kwargs)


def test_crop_geometry_is_consistent_between_pixels_labels_and_landmarks():
    # A frame with one bright dot per landmark position must show the dot, after cropping,
    # where landmarks_to_crop puts that landmark.
    t, h, w = 2, 300, 400
    points = np.array([[150.5, 120.5], [230.5, 180.5], [190.5, 90.5]], np.float32)
    frames = np.zeros((t, h, w, 3), np.uint8)
    labels = np.zeros((t, h, w), np.uint8)
    for k, (x, y) in enumerate(points):
        frames[:, int(y), int(x)] = 255
        labels[:, int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = k + 1
    lms = np.zeros((t, 478, 3), np.float32)
    lms[:, :3, :2] = points
    lms[:, 3:, :2] = points.mean(0)
    lms[:, :, 2] = 10.0
    boxes = np.array([[100.0, 50.0, 300.0, 250.0]] * t)  # 200 px -> 400 px: scale 2
    crops = crop_frames(frames, boxes, 400, border="constant")
    crop_lab = crop_labels(labels, boxes, 400)
    crop_lms = landmarks_to_crop(lms, boxes, 400)
    assert np.allclose(crop_lms[0, :3, :2], (points - [100, 50]) * 2)
    assert np.allclose(crop_lms[..., 2], 20.0)
    for k, (u, v) in enumerate(crop_lms[0, :3, :2]):
        peak = np.unravel_index(crops[0, ..., 0].argmax(), (400, 400))
        window = crops[0, int(v) - 1 : int(v) + 1, int(u) - 1 : int(u) + 1, 0]
        assert window.min() > 100, (k, peak, window)
        assert crop_lab[0, int(v), int(u)] == k + 1
    assert set(np.unique(crop_lab)) == {0, 1, 2, 3}


def test_crop_of_a_large_frame_matches_the_crop_of_the_same_frame_smaller():
    # A 16x shrink goes through the INTER_AREA pre-shrink: it must not move the picture.
    small = astronaut()
    big = cv2.resize(small, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    box = np.array([[120.3, 10.7, 330.3, 220.7]])
    ref = crop_frames(small[None], box, 64).astype(int)
    same = crop_frames(big[None], box * 4, 64).astype(int)
    moved = crop_frames(big[None], box * 4 + 12, 64).astype(int)  # ~1 crop pixel off
    assert np.abs(ref - same).mean() < 1.5
    assert np.abs(ref - moved).mean() > 3 * np.abs(ref - same).mean()


def test_nms_keeps_the_best_of_overlapping_boxes_and_separate_ones():
    boxes = np.array([
        [10, 10, 50, 50, 0.7],  # IoU 0.82 with the next one: suppressed
        [12, 12, 52, 52, 0.9],
        [60, 60, 90, 90, 0.8],  # apart from the first two
        [40, 40, 80, 80, 0.6],  # IoU 0.05 and 0.19 with the two kept: kept
    ], np.float64)  # fmt: skip
    kept = _nms(boxes, 0.3)
    assert kept[:, 4].tolist() == [0.9, 0.8, 0.6]
    assert _nms(np.zeros((0, 5)), 0.3).shape == (0, 5)


QUIET_RUN = """
import sys, threading
import numpy as np
from skimage import data
from preprocessing.faces import FaceAnalyzer
from preprocessing.parsing import LandmarkParser

frames = np.stack([data.astronaut()] * 3)

def work():
    with FaceAnalyzer() as analyzer, LandmarkParser() as parser:
        faces = analyzer.landmarks(frames, 25.0)
        parser.person_mask(frames[0])
    print("faces", [len(f) for f in faces], file=sys.stderr)

threads = [threading.Thread(target=work) for _ in range(2)]  # as the threaded runner does
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


@needs_models
def test_mediapipe_writes_no_native_log_lines():
    proc = subprocess.run([sys.executable, "-c", QUIET_RUN], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    native = [line for line in proc.stderr.splitlines()
              if re.match(r"[IWE]\d{4} |INFO: |WARNING: Logging before", line)]
    assert native == []
    assert proc.stderr.splitlines().count("faces [1, 1, 1]") == 2  # Python's own lines pass
