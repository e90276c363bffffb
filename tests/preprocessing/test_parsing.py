"""The offline landmark face parser on real portraits, the plug-in parser, and the IoU metric."""

from __future__ import annotations

import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
from skimage import data

from preprocessing import mp_models
from preprocessing.faces import (
    FaceAnalyzer,
    crop_boxes,
    crop_frames,
    landmarks_to_crop,
    select_track,
)
from preprocessing.labels import CLASS, LABELS
from preprocessing.parsing import (
    FaceParser,
    LandmarkParser,
    TorchScriptParser,
    _polygons,
    load_parser,
    parser_agreement,
    summarize_agreement,
)

needs_models = pytest.mark.skipif(
    not all(v == "ok" for v in mp_models.check().values()),
    reason=f"mediapipe models missing in {mp_models.models_dir()}: "
    f"run `{mp_models.FETCH_COMMAND}` (the install step)",
)
SIZE = 256


def grace_hopper() -> np.ndarray:
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.ascontiguousarray(matplotlib.image.imread(path)[..., :3])


def cropped(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1, SIZE, SIZE, 3) face crop and its (1, 478, 3) landmarks in crop pixels."""
    with FaceAnalyzer() as fa:
        track = select_track(fa.landmarks(img[None], fps=25), min_face_size=64)
    boxes = crop_boxes(track, margin=0.5, smooth_window=1)
    return crop_frames(img[None], boxes, SIZE), landmarks_to_crop(track, boxes, SIZE)


@pytest.fixture(scope="module")
def parser():
    with LandmarkParser() as p:
        yield p


@pytest.fixture(scope="module")
def astronaut_parsed(parser):
    frames, lms = cropped(data.astronaut())
    return frames, lms, parser.parse(frames, lms)


def label_at(labels: np.ndarray, xy: np.ndarray) -> str:
    return LABELS[labels[int(xy[1]), int(xy[0])]]


@needs_models
def test_parser_labels_the_astronaut_plausibly(astronaut_parsed):
    frames, lms, labels = astronaut_parsed
    assert labels.shape == (1, SIZE, SIZE) and labels.dtype == np.uint8
    lab, p = labels[0], lms[0, :, :2]
    # Subject's left eye (iris centre 473) appears right of the right one (468) in the image.
    assert p[473, 0] > p[468, 0]
    assert label_at(lab, p[473]) == "l_eye" and label_at(lab, p[468]) == "r_eye"
    assert label_at(lab, p[1]) == "nose"
    assert label_at(lab, (p[0] + p[13]) / 2) == "u_lip"
    assert label_at(lab, (p[14] + p[17]) / 2) == "l_lip"
    assert label_at(lab, p[50]) == "skin" and label_at(lab, p[280]) == "skin"  # cheeks
    assert label_at(lab, p[[105, 66, 52, 53]].mean(0)) == "r_brow"
    assert label_at(lab, p[[334, 296, 282, 283]].mean(0)) == "l_brow"
    face_h = p[152, 1] - p[10, 1]
    assert label_at(lab, p[10] - (0, 0.2 * face_h)) == "hair"  # above the forehead
    assert label_at(lab, p[234] - (0.1 * face_h, 0.2 * face_h)) == "hair"  # beside the temples
    assert label_at(lab, p[454] + (0.1 * face_h, -0.2 * face_h)) == "hair"
    for corner in [(2, 2), (SIZE - 3, 2)]:
        assert label_at(lab, corner) == "background"
    assert label_at(lab, p[152] + (0, 0.3 * face_h)) in {"neck", "cloth"}
    assert label_at(lab, (4, SIZE - 4)) == "cloth"  # the spacesuit, bottom left
    frac = {name: float((lab == CLASS[name]).mean()) for name in LABELS}
    assert 0.10 < frac["hair"] < 0.35, frac
    assert 0.10 < frac["skin"] < 0.30, frac
    assert frac["background"] > 0.25, frac
    assert set(np.unique(lab)) <= {CLASS[c] for c in LandmarkParser.detects}


@needs_models
def test_parser_on_grace_hopper(parser):
    frames, lms = cropped(grace_hopper())
    lab, p = parser.parse(frames, lms)[0], lms[0, :, :2]
    face_h = p[152, 1] - p[10, 1]
    assert label_at(lab, p[1]) == "nose" and label_at(lab, p[50]) == "skin"
    # Her cap: a hat, which this parser reports as hair (documented limitation).
    assert label_at(lab, p[10] - (0, 0.25 * face_h)) == "hair"
    assert label_at(lab, (2, 2)) == "background"
    assert label_at(lab, (SIZE // 2, SIZE - 3)) in {"cloth", "neck"}


@needs_models
def test_parse_is_per_frame_and_checks_shapes(parser, astronaut_parsed):
    frames, lms, labels = astronaut_parsed
    both = parser.parse(np.concatenate([frames, frames[:, :, ::-1]]), np.concatenate([lms, lms]))
    assert np.array_equal(both[0], labels[0])
    assert not np.array_equal(both[1], labels[0])  # flipped image, unflipped landmarks
    with pytest.raises(ValueError):
        parser.parse(frames, lms[:0])
    assert isinstance(parser, FaceParser) and parser.name == "landmarks"
    assert parser.version.startswith("1+selfie-")


def test_polygons_come_from_mediapipe_connections():
    poly = _polygons()
    assert len(poly["oval"]) == 36 and len(set(poly["oval"])) == 36
    assert len(poly["l_eye"]) == 18 and {263, 362} <= set(poly["l_eye"])
    assert {0, 13} <= set(poly["u_lip"]) and {17, 14} <= set(poly["l_lip"])
    assert {13, 14} <= set(poly["mouth"]) and 0 not in poly["mouth"]


def test_load_parser():
    with pytest.raises(FileNotFoundError, match="weights.*'landmarks'"):
        load_parser("bisenet")
    with pytest.raises(ValueError, match="unknown face parser"):
        load_parser("nope")
    if all(v == "ok" for v in mp_models.check().values()):
        assert isinstance(load_parser("landmarks"), LandmarkParser)


def red_is_skin(torch):
    class RedIsSkin(torch.nn.Module):
        """Logit of class 1 = normalised red channel, class 0 = 0, others very low."""

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = torch.cat([torch.zeros_like(x[:, :1]), x[:, :1], x[:, :17] * 0 - 100.0], 1)
            return logits, logits  # BiSeNet returns (out, aux...)

    return RedIsSkin()


def check_plugin(path) -> None:
    frames = np.zeros((3, 60, 100, 3), np.uint8)
    frames[:, :, :40, 0] = 255  # red on the left 40 columns
    plugin = load_parser("bisenet", weights=path)
    assert isinstance(plugin, TorchScriptParser) and plugin.name == "bisenet"
    assert len(plugin.version) == 12
    out = plugin.parse(frames, np.zeros((3, 478, 3), np.float32))
    assert out.shape == (3, 60, 100) and out.dtype == np.uint8
    assert (out[:, :, :38] == 1).all() and (out[:, :, 42:] == 0).all()
    hair = np.arange(19, dtype=np.uint8)
    hair[1] = CLASS["hair"]
    mapped = TorchScriptParser(path, class_map=hair).parse(frames)
    assert (mapped[:, :, :38] == CLASS["hair"]).all()


def test_plugin_runs_a_torch_export_file(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.zeros(8, 3, 512, 512)  # the plug-in's default batch
    program = torch.export.export(red_is_skin(torch), (x,))
    torch.export.save(program, tmp_path / "parser.pt2")
    check_plugin(tmp_path / "parser.pt2")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_plugin_runs_a_torchscript_file(tmp_path):
    torch = pytest.importorskip("torch")
    torch.jit.script(red_is_skin(torch)).save(str(tmp_path / "parser.pt"))
    check_plugin(tmp_path / "parser.pt")


def test_parser_agreement_is_per_class_iou():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2] = CLASS["hair"]  # 8 px
    pred = np.zeros((4, 4), np.uint8)
    pred[:1] = CLASS["hair"]  # 4 px, all inside
    pred[3, :2] = CLASS["skin"]
    iou = parser_agreement(pred, truth, ["hair", "skin", "background", "hat"])
    assert iou["hair"] == pytest.approx(4 / 8)
    assert iou["skin"] == 0.0
    assert iou["background"] == pytest.approx(6 / 12)
    assert np.isnan(iou["hat"])
    assert set(parser_agreement(pred, truth)) == {"background", "skin", "hair"}
    assert parser_agreement(truth, truth)["hair"] == 1.0
    with pytest.raises(ValueError):
        parser_agreement(pred[:2], truth)


def test_summarize_agreement_averages_each_class_over_the_clips_that_show_it():
    clips = [
        {"hair": 0.5, "skin": 1.0, "hat": float("nan")},
        {"hair": 0.7, "skin": 0.8},
        {"skin": 0.6, "eye_g": 0.25},
    ]
    s = summarize_agreement(clips)
    assert s["clips"] == 3
    assert s["iou"] == pytest.approx({"hair": 0.6, "skin": 0.8, "eye_g": 0.25})
    assert "hat" not in s["iou"]  # NaN everywhere: nothing to agree on
    assert s["miou"] == pytest.approx((0.6 + 0.8 + 0.25) / 3)
    empty = summarize_agreement([])
    assert empty["clips"] == 0 and empty["iou"] == {} and np.isnan(empty["miou"])
