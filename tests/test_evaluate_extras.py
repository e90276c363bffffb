"""The evaluate stage's optional metrics: what gets measured with weights present, and how a
metric that cannot be measured is reported (never as a number)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from metric_models import write_metric_weights

from durian.data.clip_codec import Clip
from durian.evaluation.cases import self_transfer_case
from flows.evaluate import (
    SetFeatures,
    load_evaluators,
    mean_metrics,
    metrics_table,
    optional_case_metrics,
    set_metrics,
    skip_reasons,
)
from flows.params import EvaluateParams
from synthetic import random_attributes, random_identity, random_motion, render_video


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    identity, attributes = random_identity(rng), random_attributes(rng, {"hair": 1.0})
    images, labels, landmarks = render_video(identity, attributes, random_motion(rng, 8), 64)
    clip = Clip(images, labels, landmarks.astype(np.float32), {})
    return self_transfer_case(clip, f"k{seed}", num_frames=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_metric_weights(tmp_path_factory.mktemp("weights"))


def test_without_weights_every_optional_metric_says_why(tmp_path):
    e = EvaluateParams(identity="none")
    ev = load_evaluators(e, tmp_path, video_dir=None)
    assert ev.perceptual.lpips is None and ev.embedder is None and ev.clip is None
    assert set(ev.skipped) == {"lpips", "fid", "fvd", "id_sim", "attr_clip_sim"}
    case = _case()
    feats = SetFeatures()
    values, why = optional_case_metrics(case, case.target, ev, e, feats)
    assert set(values) == {"attr_hist_sim", "attr_crop_ssim"}  # the weight-free default
    # the ground truth wears the reference's hair (another frame of the clip): close, not equal
    assert values["attr_hist_sim"] > 0.7 and why == {}
    noise = np.random.default_rng(0).integers(0, 255, case.target.shape, dtype=np.uint8)
    worse, _ = optional_case_metrics(case, noise, ev, e, feats)
    assert worse["attr_hist_sim"] < values["attr_hist_sim"] - 0.3
    assert worse["attr_crop_ssim"] < values["attr_crop_ssim"]
    assert set_metrics(feats, ev) == ({}, {})
    table = metrics_table({"l1": 0.5}, ev.skipped)
    assert "l1" in table and "fid" in table and "skipped: evaluate.metric_weights" in table


def test_a_relative_weights_folder_is_read_from_the_project(weights, tmp_path):
    e = EvaluateParams(metric_weights=weights.name, identity="none")
    ev = load_evaluators(e, weights.parent, video_dir=None)
    assert "fid" not in ev.skipped and ev.perceptual.inception is not None


def test_with_weights_the_perceptual_metrics_are_measured(weights, tmp_path):
    e = EvaluateParams(metric_weights=str(weights), identity="none")
    ev = load_evaluators(e, tmp_path, video_dir=None)
    assert set(ev.skipped) == {"id_sim", "attr_clip_sim"}
    feats = SetFeatures()
    per_case = []
    for seed in (0, 1):
        case = _case(seed)
        values, _ = optional_case_metrics(case, case.target, ev, e, feats)
        per_case.append(values)
    assert all(v["lpips"] == pytest.approx(0.0, abs=1e-9) for v in per_case)
    values, why = set_metrics(feats, ev)
    assert values["fid"] == pytest.approx(0.0, abs=1e-6)  # perfect outputs: same statistics
    assert values["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert why == {}
    # an output that is off gets a positive LPIPS and FID
    case = _case(2)
    worse = SetFeatures()
    noisy = np.clip(case.target.astype(int) + 40, 0, 255).astype(np.uint8)
    values, _ = optional_case_metrics(case, noisy, ev, e, worse)
    assert values["lpips"] > 0
    assert set_metrics(worse, ev)[0]["fid"] > 0


def test_one_video_is_not_enough_for_fvd(weights, tmp_path):
    e = EvaluateParams(metric_weights=str(weights), identity="none")
    ev = load_evaluators(e, tmp_path, video_dir=None)
    feats = SetFeatures()
    case = _case()
    optional_case_metrics(case, case.target, ev, e, feats)
    values, why = set_metrics(feats, ev)
    assert "fid" in values  # 3 frames
    assert "fvd" not in values and why["fvd"] == "needs at least 2 videos, the set has 1"


def test_no_face_leaves_identity_similarity_out_with_its_reason(tmp_path):
    e = EvaluateParams(identity="dlib", identity_frames=2)
    ev = load_evaluators(e, tmp_path, video_dir=None)
    assert ev.embedder is not None and "id_sim" not in ev.skipped
    case = _case()
    per_case, reasons = [], {}
    grey = np.full_like(case.target, 128)
    for _ in range(2):
        values, why = optional_case_metrics(case, grey, ev, e, SetFeatures())
        per_case.append({"case": 0, **values})
        for k, r in why.items():
            reasons.setdefault(k, []).append(r)
    assert math.isnan(per_case[0]["id_sim"])
    means = mean_metrics(per_case)
    assert "id_sim" not in means and "attr_hist_sim" in means
    skipped = skip_reasons(means, reasons, prefix="xid_")
    assert list(skipped) == ["xid_id_sim"]
    assert (
        skipped["xid_id_sim"].startswith("no face found") and "(2 cases)" in skipped["xid_id_sim"]
    )


def test_missing_arcface_or_clip_models_are_skips_not_errors(tmp_path):
    e = EvaluateParams(identity="arcface", arcface_model="nope.onnx", clip_model="no-clip")
    ev = load_evaluators(e, tmp_path, video_dir=None)
    assert ev.embedder is None and "arcface face embedder unavailable" in ev.skipped["id_sim"]
    assert ev.clip is None and "CLIP image encoder unavailable" in ev.skipped["attr_clip_sim"]
