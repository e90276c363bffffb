"""The shards' identity embeddings reach the model: the loader yields them for a model that
reads them, a tiny model trains on them, and data without them stop the run by name."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from data_synth import make_clip
from project_helpers import write_clip_shards

from durian.data.clip_codec import Clip
from durian.data.loader import IdentityEmbeddingError, make_loader
from durian.data.pair_config import PairConfig
from durian.models.config import ModelConfig, identity_embedder_of
from durian.models.profiles import build_model, noise_scheduler_for
from durian.training.step import training_loss

PAIR = PairConfig(resolution=32, min_gap=2)


def embedding(shard: int, clip: int) -> np.ndarray:
    return np.random.default_rng([shard, clip]).standard_normal(128).astype(np.float32)


def clip_with_identity(shard: int, clip: int, embedder: str | None = "dlib") -> Clip:
    """A drawn clip as preprocessing writes it: with ``embedder``'s embedding, except clip 2,
    where (as for a clip whose frames show no face) the embedder found none."""
    base = make_clip(num_frames=8, categories=("hair",), identity=f"id{shard}_{clip}", seed=clip)
    if embedder is None:
        return base
    found = clip != 2
    meta = {**base.meta, "identity_embedder": embedder, "identity_frame": 4 if found else None}
    return replace(base, meta=meta, identity=embedding(shard, clip) if found else None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, list[str]]:
    d = tmp_path_factory.mktemp("identity_shards")
    return {
        "dlib": write_clip_shards(d / "dlib", 1, 3, clip_with_identity),
        "none": write_clip_shards(d / "none", 1, 2, lambda s, c: clip_with_identity(s, c, None)),
    }


def one_batch(shards: list[str], embedder: str | None, size: int = 2) -> dict:
    loader = make_loader(shards, PAIR, batch_size=size, epochs=1, identity_embedder=embedder)
    return next(iter(loader))


def test_loader_yields_the_stored_embeddings_and_skips_faceless_clips(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="durian.data.loader"):
        batches = list(make_loader(shards["dlib"], PAIR, batch_size=3, epochs=1,
                                   identity_embedder="dlib"))  # fmt: skip
    (batch,) = batches  # 3 clips, the faceless one left out
    assert sorted(batch["key"]) == ["vid0_0000", "vid0_0001"]
    for key, row in zip(batch["key"], batch["identity_embedding"], strict=True):
        np.testing.assert_array_equal(row.numpy(), embedding(0, int(key[-4:])))
    assert "skipped 1 clips without a dlib identity embedding" in caplog.text
    # A model that embeds the portrait with CLIP gets no embedding (and no clip is skipped).
    plain = one_batch(shards["dlib"], None, size=3)
    assert "identity_embedding" not in plain and len(plain["key"]) == 3


def test_shards_without_the_models_embedding_stop_the_run_naming_the_shard(shards):
    with pytest.raises(IdentityEmbeddingError, match=r"train-000000\.tar.*no identity embedder"):
        one_batch(shards["none"], "dlib")
    with pytest.raises(IdentityEmbeddingError, match="reads a arcface .* with dlib identity"):
        one_batch(shards["dlib"], "arcface")


def test_identity_embedding_setting_sets_the_projector_width():
    assert ModelConfig().switches() == {}  # tiny and sd15 keep CLIP unless told
    assert ModelConfig(identity_embedding="dlib").switches() == {"identity_embed_dim": 128}
    assert ModelConfig(identity_embedding="arcface").switches() == {"identity_embed_dim": 512}
    assert ModelConfig(identity_embedding="clip").switches() == {"identity_embed_dim": None}
    assert identity_embedder_of({"identity_embed_dim": 512}) == "arcface"
    assert identity_embedder_of({"identity_embed_dim": None}) is None
    with pytest.raises(ValueError, match="no embedder gives that width"):
        identity_embedder_of({"identity_embed_dim": 100})


def test_a_tiny_dlib_model_trains_on_the_shard_embeddings(shards):
    torch.manual_seed(0)
    model = build_model("tiny", resolution=32, identity_embedding="dlib")
    assert identity_embedder_of(model.config) == "dlib"
    assert model.identity_projector.mlp[0].in_features == 128
    model.set_stage(1)
    scheduler = noise_scheduler_for(model)
    batch = one_batch(shards["dlib"], identity_embedder_of(model.config))
    loss = training_loss(model, scheduler, batch, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.identity_projector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # The embedding steers the loss: other embeddings, another loss (same noise and timesteps).
    other = {**batch, "identity_embedding": torch.randn_like(batch["identity_embedding"])}
    with torch.no_grad():
        again = training_loss(model, scheduler, other, torch.Generator().manual_seed(0))
    assert again.item() != pytest.approx(loss.item(), rel=1e-6)
    # A batch without it (a loader not told what the model reads) is refused by name.
    del batch["identity_embedding"]
    with pytest.raises(ValueError, match="reads 128-d identity embeddings but the batch has none"):
        training_loss(model, scheduler, batch)
