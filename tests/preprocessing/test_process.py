"""process_clip end to end: detector path on a real face, ground-truth path on a synthetic one."""

from __future__ import annotations

import inspect
import json
import pickle

import cv2
import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from durian.data.clip_codec import Clip
from flows.params import PreprocessParams
from preprocessing import mp_models
from preprocessing.crop import ProcessedClip, process_clip
from preprocessing.faces import ClipRejected, FaceAnalyzer, track_face
from preprocessing.labels import CLASS, LABELS
from preprocessing.parsing import LandmarkParser, _clean_hair, _ColourModel

needs_models = pytest.mark.skipif(
    not all(v == "ok" for v in mp_models.check().values()),
    reason=f"mediapipe models missing in {mp_models.models_dir()}: "
    f"run `{mp_models.FETCH_COMMAND}` (the install step)",
)
KW = dict(fps=25.0, size=128, margin=0.5, min_face_size=48)


@pytest.fixture(scope="module")
def tools():
    with FaceAnalyzer() as analyzer, LandmarkParser() as parser:
        yield analyzer, parser


def moving_astronaut(t: int = 6) -> np.ndarray:
    """The astronaut drifting right and zooming in slightly: a tiny real-face video."""
    img = data.astronaut()
    frames = []
    for i in range(t):
        m = cv2.getRotationMatrix2D((256, 200), 0.0, 1.0 + 0.02 * i)
        m[0, 2] += 5 * i
        frames.append(cv2.warpAffine(img, m, (512, 512), borderMode=cv2.BORDER_REPLICATE))
    return np.stack(frames)


@needs_models
def test_detector_path_crops_tracks_and_parses(tools):
    analyzer, parser = tools
    frames = moving_astronaut()
    out = process_clip(frames, parser=parser, analyzer=analyzer, **KW)
    assert isinstance(out, ProcessedClip)
    assert out.frames.shape == (6, 128, 128, 3) and out.frames.dtype == np.uint8
    assert out.parsing.shape == (6, 128, 128) and out.parsing.dtype == np.uint8
    assert out.landmarks.shape == (6, 478, 3) and out.landmarks.dtype == np.float32
    assert out.boxes.shape == (6, 4)
    assert out.parser_name == "landmarks" and out.parser_version == parser.version
    # The crop follows the face: the nose tip stays put in the crop while it moves in the frame.
    nose = out.landmarks[:, 1, :2]
    assert np.all(np.abs(nose - nose.mean(0)) < 3.0), nose
    assert np.all(np.abs(nose - (64, 70)) < 12), nose
    # The nose tip and eyes carry their labels in every frame.
    for t in range(6):
        assert out.parsing[t, int(nose[t, 1]), int(nose[t, 0])] == CLASS["nose"]
    assert (out.parsing == CLASS["hair"]).mean() > 0.08
    # What a shard stores: the Clip codec accepts it, the metadata is plain JSON.
    clip = Clip(out.frames, out.parsing, out.landmarks, {"fps": 25.0, **out.meta()})
    meta = json.loads(json.dumps(clip.meta))
    assert meta["parser"]["name"] == "landmarks" and len(meta["crop_boxes"]) == 6
    assert meta["stray_face_frames"] == []


@needs_models
def test_detector_path_rejects_a_clip_without_a_face(tools):
    analyzer, parser = tools
    with pytest.raises(ClipRejected) as err:
        process_clip(np.zeros((3, 200, 200, 3), np.uint8), parser=parser, analyzer=analyzer, **KW)
    assert err.value.reason == "no_face"


def astronaut_with_passer_by(t: int = 6, present: tuple[int, ...] = (4, 5)) -> np.ndarray:
    """The astronaut in a wider frame; Grace Hopper (a face ~0.8x his) at the right edge in
    the ``present`` frames, moving left: someone walking into the picture."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    grace = np.ascontiguousarray(matplotlib.image.imread(path)[..., :3])
    grace = cv2.resize(grace, (222, 260), interpolation=cv2.INTER_AREA)
    wide = np.concatenate([data.astronaut(), np.full((512, 256, 3), 120, np.uint8)], axis=1)
    frames = np.repeat(wide[None], t, axis=0)
    for i in present:
        x = 768 - 222 - 10 * (t - 1 - i)
        frames[i, 20:280, x : x + 222] = grace
    return frames


@needs_models
def test_detector_path_keeps_a_clip_with_a_passer_by_and_notes_the_frames(tools):
    analyzer, parser = tools
    frames = astronaut_with_passer_by()
    out = process_clip(frames, parser=parser, analyzer=analyzer, **KW)
    assert out.meta()["stray_face_frames"] == [4, 5]
    assert np.all(out.boxes[:, 2] < 512), out.boxes  # the crop stays on the astronaut
    # 2 of 6 frames: a rule that rejects from 30 % of the frames rejects it.
    with pytest.raises(ClipRejected) as err:
        process_clip(frames, parser=parser, analyzer=analyzer, second_face_min_fraction=0.3, **KW)
    assert err.value.reason == "multiple_faces" and "2 of 6 frames" in err.value.detail


def test_second_face_params_default_to_the_library_defaults_and_are_validated():
    params = PreprocessParams()
    for fn in (track_face, process_clip):
        signature = inspect.signature(fn).parameters
        for key in ("second_face_min_ratio", "second_face_min_fraction"):
            assert signature[key].default == getattr(params, key), (fn.__name__, key)
    for bad in ({"second_face_min_fraction": 0.0}, {"second_face_min_fraction": 1.2},
                {"second_face_min_ratio": 0.0}, {"second_face_min_ratio": 1.5}):  # fmt: skip
        with pytest.raises(ValidationError, match=next(iter(bad))):
            PreprocessParams(**bad)


def synthetic(t: int = 4, h: int = 240, w: int = 320):
    """A synthetic 'video' whose colours encode its labels exactly, plus landmarks.

    Regions (source pixels): skin square, two eye squares, a lip bar, hair band above; the face
    drifts right 6 px per frame. Landmarks: 478 points on the face square's border (a real
    generator would give the mesh; only the geometry matters here), the first 4 marking the
    eye and lip centres.
    """
    palette = np.array([[0, 0, 0], [230, 180, 150], [40, 40, 200], [40, 200, 40],
                        [200, 40, 40], [90, 60, 30]], np.uint8)  # fmt: skip
    ids = np.array([CLASS[c] for c in ("background", "skin", "l_eye", "r_eye", "u_lip", "hair")])
    frames = np.zeros((t, h, w, 3), np.uint8)
    parsing = np.zeros((t, h, w), np.uint8)
    lms = np.zeros((t, 478, 3), np.float32)
    for i in range(t):
        x0 = 100 + 6 * i
        regions = [  # (index into palette/ids, x0, y0, x1, y1)
            (5, x0 - 10, 40, x0 + 110, 70),
            (1, x0, 70, x0 + 100, 170),
            (3, x0 + 15, 95, x0 + 35, 110),  # subject's right eye: image left
            (2, x0 + 65, 95, x0 + 85, 110),
            (4, x0 + 30, 140, x0 + 70, 150),
        ]
        for k, a, b, c, d in regions:
            frames[i, b:d, a:c] = palette[k]
            parsing[i, b:d, a:c] = ids[k]
        u = np.linspace(0, 1, 119, endpoint=False)
        z = 0 * u
        border = np.concatenate([
            np.stack([x0 + 100 * u, 70 + z], 1), np.stack([x0 + 100 + z, 70 + 100 * u], 1),
            np.stack([x0 + 100 - 100 * u, 170 + z], 1), np.stack([x0 + z, 170 - 100 * u], 1),
        ])  # fmt: skip
        lms[i, 2:, :2] = border[:476]
        lms[i, :2, :2] = [[x0 + 75, 102.5], [x0 + 50, 145]]  # l_eye and lip centres
        lms[i, :, 2] = 4.0
    return frames, parsing, lms, palette, ids


def test_ground_truth_path_crops_labels_and_landmarks_consistently():
    frames, parsing, lms, palette, ids = synthetic()
    out = process_clip(
        frames, parser=None, analyzer=None, smooth_window=1,  # no smoothing: exact tracking
        ground_truth={"landmarks": lms, "parsing": parsing}, **KW,
    )  # fmt: skip
    assert out.parser_name == "ground_truth" and out.parser_version == "exact"
    assert out.meta()["stray_face_frames"] == []
    assert out.parser_classes == list(LABELS)
    assert out.parsing.shape == (4, 128, 128) and out.landmarks.shape == (4, 478, 3)
    # Labels and pixels were cropped by the same geometry: away from region edges the colour
    # of every pixel is the colour of its label.
    lut = np.zeros((256, 3), np.int32)
    lut[ids] = palette
    expected = lut[out.parsing]
    k = np.ones((3, 3), np.uint8)
    # Pixels at least two crop pixels from any label edge (per frame: cv2 takes 2-D maps).
    flat = [cv2.morphologyEx(p, cv2.MORPH_GRADIENT, k) == 0 for p in out.parsing]
    inner = np.stack([cv2.erode(f.astype(np.uint8), k) for f in flat]) > 0
    diff = np.abs(out.frames.astype(np.int32) - expected).max(-1)
    assert inner.mean() > 0.7 and diff[inner].max() <= 2, diff[inner].max()
    # Landmarks land on their regions in the crop (eye centre, lip centre), every frame.
    for t in range(4):
        (ex, ey), (lx, ly) = out.landmarks[t, 0, :2], out.landmarks[t, 1, :2]
        assert out.parsing[t, int(ey), int(ex)] == CLASS["l_eye"]
        assert out.parsing[t, int(ly), int(lx)] == CLASS["u_lip"]
    # The face drifts in the frame but stays put in the crop; z scales with x.
    assert np.ptp(out.landmarks[:, 0, 0]) < 0.01
    scale = 128 / (out.boxes[:, 2] - out.boxes[:, 0])
    assert np.allclose(out.landmarks[:, :, 2], 4.0 * scale[:, None], rtol=1e-5)


def test_ground_truth_path_still_applies_the_face_size_rule():
    frames, parsing, lms, _, _ = synthetic()
    gt = {"landmarks": lms, "parsing": parsing, "version": "gen-3"}
    with pytest.raises(ClipRejected) as err:
        process_clip(frames, parser=None, analyzer=None, ground_truth=gt,
                     **{**KW, "min_face_size": 150})  # fmt: skip
    assert err.value.reason == "face_too_small"
    ok = process_clip(frames, parser=None, analyzer=None, ground_truth=gt, **KW)
    assert ok.parser_version == "gen-3"
    with pytest.raises(ValueError, match="ground truth"):
        process_clip(frames, parser=None, analyzer=None,
                     ground_truth={"landmarks": lms[:2], "parsing": parsing}, **KW)  # fmt: skip
    with pytest.raises(ValueError, match="analyzer and a parser"):
        process_clip(frames, parser=None, analyzer=None, **KW)


# --- the landmark parser's per-frame work: faster, same labels --------------------------------


def clean_hair_by_label_images(labels: np.ndarray, editable: np.ndarray) -> np.ndarray:
    """``_clean_hair`` as first written: one 5x5 count image per label (the reference)."""
    hair = (labels == CLASS["hair"]).astype(np.uint8)
    closed = cv2.morphologyEx(hair, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    labels = np.where((closed > 0) & editable, CLASS["hair"], labels).astype(np.uint8)
    hair = (labels == CLASS["hair"]).astype(np.uint8)
    opened = cv2.morphologyEx(hair, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    specks = (hair > 0) & (opened == 0)
    not_hair = np.where(hair > 0, 255, labels).astype(np.uint8)
    best = np.zeros(labels.shape, np.int32)
    best_label = labels.copy()
    for lab in np.unique(not_hair[not_hair != 255]):
        count = cv2.boxFilter((not_hair == lab).astype(np.float32), -1, (5, 5), normalize=False)
        better = count > best
        best = np.where(better, count, best)
        best_label = np.where(better, lab, best_label)
    return np.where(specks, best_label, labels).astype(np.uint8)


@pytest.mark.parametrize("seed", range(4))
def test_clean_hair_fills_specks_like_the_per_label_count(seed):
    rng = np.random.default_rng(seed)
    # Blocks of labels with hair specks sprinkled over them (some on the border, some in a
    # hair-only neighbourhood), so ties, mirrored borders and all-hair windows all occur.
    blocks = rng.choice([0, 1, 2, 13, 14, 16, 17, 18], (12, 16))
    labels = np.kron(blocks, np.ones((6, 6), np.int64)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.04] = CLASS["hair"]
    labels[:5, :5] = CLASS["hair"]
    labels[2, 2] = 1
    editable = rng.random(labels.shape) < 0.5
    got = _clean_hair(labels, editable)
    assert np.array_equal(got, clean_hair_by_label_images(labels, editable))
    assert (got != labels).any()  # the case did exercise the fill


def test_colour_distance_is_the_weighted_distance_in_stds():
    rng = np.random.default_rng(0)
    model = _ColourModel(rng.normal([60, 10, 20], [8, 4, 5], (500, 3)).astype(np.float32))
    lab = rng.uniform([0, -60, -60], [100, 60, 60], (32, 48, 3)).astype(np.float32)
    exact = np.sqrt((((lab - model.mean) / model.std * model.weight) ** 2).sum(-1))
    got = model.distance(lab)
    assert got.shape == (32, 48) and got.dtype == np.float32
    assert np.allclose(got, exact, rtol=1e-5, atol=1e-4)


@needs_models
def test_person_masks_segment_keyframes_and_blend_between(tools):
    _, parser = tools
    frames = np.stack([cv2.resize(f, (128, 128)) for f in moving_astronaut(7)])
    masks = parser.person_masks(frames)  # the default: every frame
    assert masks.shape == (7, 128, 128) and masks.dtype == np.float32
    assert all(np.array_equal(masks[i], parser.person_mask(frames[i])) for i in range(7))
    with LandmarkParser(segment_every=3) as sparse:
        assert sparse.version == parser.version + "+every3"
        assert pickle.loads(pickle.dumps(sparse)).segment_every == 3
        blended = sparse.person_masks(frames)
    # Keyframes 0, 3, 6 are the model's own masks; frame 4 is 2/3 of frame 3's and 1/3 of 6's.
    for k in (0, 3, 6):
        assert np.array_equal(blended[k], masks[k])
    assert np.allclose(blended[4], masks[3] * 2 / 3 + masks[6] / 3, atol=1e-5)
    with pytest.raises(ValueError, match="segment_every"):
        LandmarkParser(segment_every=0)
