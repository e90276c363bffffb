"""The clip's identity embedding in the shards: computed on one crop frame, stored as
``identity.npy``, named with its frame in the sample's ``json``."""

from __future__ import annotations

import numpy as np
import pytest
from project_helpers import ROOT

from durian.data.clip_codec import decode_clip
from flows.params import PreprocessParams, load_params
from flows.preprocess import identity_setting, process_video, stage_config
from preprocessing.identity import (
    clip_identity,
    embedder_for,
    identity_frames,
    parse_embedder_spec,
)
from preprocessing.ingest import ingest
from synthetic.sample import generate_sample


def test_a_preprocessed_sample_carries_the_embedding_of_its_named_frame(tmp_path, dlib_embedder):
    # A synthetic portrait video, its clip cropped at 64² as the sample pipeline does.
    videos = generate_sample(tmp_path, n_synthetic=1, n_frames=8, size=128, fps=12, seed=1,
                             real_photos=False)  # fmt: skip
    _, clips = ingest([str(v) for v in videos], fps=12, clip_frames=8, min_clip_frames=6)
    cfg = {**stage_config(load_params(ROOT / "params.yaml")), "parser_check": False,
           "val_fraction": 0.0}  # fmt: skip
    out = process_video(clips, cfg)
    assert not out["rejected"] and len(out["samples"]) == 1
    entry = out["samples"][0]
    clip = decode_clip(entry["sample"])  # lossless: the frames the embedding was computed on
    assert clip.frames.shape[1:3] == (64, 64)
    assert clip.meta["identity_embedder"] == "dlib" and not entry["identity_missing"]
    frame = clip.meta["identity_frame"]
    assert frame == identity_frames(clip.num_frames)[0]  # dlib sees the face at 64² mid-clip
    assert clip.identity.dtype == np.float32 and clip.identity.shape == (128,)
    expected = dlib_embedder.embed(clip.frames[frame]).astype(np.float32)
    np.testing.assert_array_equal(clip.identity, expected)


def test_frames_tried_middle_first_and_a_faceless_clip_has_none(dlib_embedder):
    assert identity_frames(8) == [4, 2, 5, 0, 7]
    assert identity_frames(1) == [0]
    grey = np.full((6, 64, 64, 3), 128, np.uint8)
    assert clip_identity(grey, dlib_embedder) == (None, None)


def test_embedder_settings(tmp_path):
    assert parse_embedder_spec("dlib") == ("dlib", None)
    assert parse_embedder_spec("none") == ("none", None)
    assert parse_embedder_spec("arcface:models/w600k.onnx") == ("arcface", "models/w600k.onnx")
    for bad in ("arcface", "arcface:", "clip"):
        with pytest.raises(ValueError, match="expected dlib, arcface"):
            parse_embedder_spec(bad)
    assert embedder_for("none") is None
    assert embedder_for("dlib") is embedder_for("dlib")  # loaded once per thread
    assert identity_setting("arcface:m.onnx", tmp_path) == f"arcface:{tmp_path / 'm.onnx'}"
    assert identity_setting("dlib", tmp_path) == "dlib"
    # ArcFace without its model (or without onnxruntime) fails when the stage starts.
    with pytest.raises((FileNotFoundError, ImportError)):
        embedder_for(f"arcface:{tmp_path / 'missing.onnx'}")
    with pytest.raises(ValueError, match="identity_embedder"):
        PreprocessParams(identity_embedder="clip")
