"""Inference embeds the portrait for a model that reads an identity embedding, the way
preprocessing embeds a clip, and the pipeline's output follows that embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import (
    SIZE,
    astronaut,
    grace_hopper,
    save_png,
    synthetic_portrait,
    tiny_pipeline,
)

from durian.inference import animate
from durian.inference.errors import DurianInputError
from preprocessing.identity import embedder_for

RUN = {"steps": 1, "guidance": 2.0, "seed": 5, "progress": False, "frames": 2}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(identity_embedding="dlib")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """Two real faces, a drawn attribute image, and exact labels (so the crop needs no
    detector) on a flat picture: no face for dlib."""
    d = tmp_path_factory.mktemp("identity_media")
    out = {name: save_png(d / f"{name}.png", image())
           for name, image in (("astronaut", astronaut), ("grace", grace_hopper))}  # fmt: skip
    out["glasses"] = synthetic_portrait(d / "glasses.png", seed=3, categories=("hair", "glasses"))
    out["faceless"] = synthetic_portrait(d / "faceless.png", seed=3, categories=("hair",))
    save_png(out["faceless"], np.full((192, 192, 3), 128, np.uint8))
    return out


def test_the_portrait_crop_is_embedded_as_preprocessing_embeds_a_frame(pipe, prep, media):
    face = prep.face(media["astronaut"])
    embedding = prep.identity_embedding(face, pipe.model.config)
    assert embedding.dtype == np.float32 and embedding.shape == (128,)
    # dlib on the crop at the model's resolution (64²), as process_video on a shard's frame.
    np.testing.assert_array_equal(embedding, embedder_for("dlib").embed(face.image))
    assert prep.identity_embedding(face, tiny_pipeline().model.config) is None  # CLIP model


def test_animate_conditions_on_the_portraits_embedding(pipe, prep, media):
    anim = animate(pipe, media["astronaut"], [(media["glasses"], "hair")], "nod", preparer=prep,
                   **RUN)  # fmt: skip
    own = torch.from_numpy(prep.identity_embedding(anim.portrait, pipe.model.config))
    other = torch.from_numpy(prep.identity_embedding(prep.face(media["grace"]), pipe.model.config))

    def direct(identity: torch.Tensor) -> np.ndarray:
        attribute = anim.attributes[0]
        return pipe(
            anim.portrait.image, anim.portrait_mask, attribute.face.image, attribute.mask,
            anim.keypoints, num_inference_steps=RUN["steps"], guidance_scale=RUN["guidance"],
            generator=torch.Generator().manual_seed(RUN["seed"]), identity_embedding=identity,
        ).frames  # fmt: skip

    np.testing.assert_array_equal(anim.frames, direct(own))
    assert np.abs(direct(other).astype(int) - anim.frames).max() > 0


def test_a_portrait_the_embedder_sees_no_face_in_is_refused(pipe, prep, media):
    with pytest.raises(DurianInputError, match="dlib face embedder finds no face in the portrait"):
        animate(pipe, media["faceless"], [(media["glasses"], "hair")], "nod", preparer=prep,
                **RUN)  # fmt: skip


def test_evaluation_conditions_each_case_on_its_portrait_and_leaves_faceless_ones_out(
    pipe, tmp_path
):
    from dataclasses import replace

    from durian.data.clip_codec import Clip
    from durian.evaluation.cases import self_transfer_case
    from flows.evaluate import load_evaluators, model_identity_embedder, run_cases
    from flows.params import EvaluateParams
    from preprocessing.faces import FaceAnalyzer
    from synthetic import random_attributes, random_identity, random_motion, render_video

    rng = np.random.default_rng(1)  # a synthetic portrait dlib finds at 64² (9 of 12 seeds)
    identity, attributes = random_identity(rng), random_attributes(rng, {"hair": 1.0})
    images, labels, landmarks = render_video(identity, attributes, random_motion(rng, 6), SIZE)
    case = self_transfer_case(Clip(images, labels, landmarks, {}), "k0", num_frames=2)
    faceless = replace(case, key="grey", portrait=np.full_like(case.portrait, 128))
    e = EvaluateParams(identity="none", steps=1)
    ev = load_evaluators(e, tmp_path, video_dir=None)  # no weights: no optional metric
    ev.model_identity = model_identity_embedder(pipe, e, tmp_path, ev.embedder)
    assert ev.model_identity.name == "dlib"
    with FaceAnalyzer() as analyzer:
        per_case, *_, reasons = run_cases(pipe, [case, faceless], e, "self", analyzer, ev)
    assert [c["key"] for c in per_case] == ["k0"]
    assert reasons["cases"] == ["left out: the dlib face embedder finds no face in the portrait, "
                                "and the model reads its identity embedding"]
