from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from data_synth import make_clip, write_shards

from durian.data.loader import ShardExamples, expand_shards, make_loader
from durian.data.masks import build_mask_bank
from durian.data.pairs import PairConfig

CFG = PairConfig(resolution=(32, 32), num_frames=2, frame_stride=2, min_gap=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), clips_per_shard=3, num_shards=4)


def _keys(dataset: ShardExamples) -> list[str]:
    return [ex["key"] for ex in dataset]


def test_batches_follow_the_model_contract(shards: list[str], tmp_path: Path) -> None:
    bank = build_mask_bank([make_clip(identity=f"b{i}", seed=50 + i) for i in range(3)], 8,
                           np.random.default_rng(0))  # fmt: skip
    bank.save(tmp_path / "bank.npz")
    loader = make_loader(shards, CFG, batch_size=4, num_workers=0, rank=0, world_size=1, seed=0,
                         mask_bank=tmp_path / "bank.npz", epochs=1)  # fmt: skip
    batches = list(loader)
    assert len(batches) == 3  # 12 clips, batch 4
    b = batches[0]
    assert b["target"].shape == (4, 2, 3, 32, 32) and b["keypoints"].shape == (4, 2, 3, 32, 32)
    assert b["identity_ref"].shape == b["attribute_ref"].shape == (4, 3, 32, 32)
    assert b["identity_mask"].shape == b["attribute_mask"].shape == (4, 1, 32, 32)
    assert b["drop_identity"].shape == b["drop_attribute"].shape == (4,)
    assert b["drop_identity"].dtype == torch.bool
    for k in ("target", "identity_ref", "attribute_ref", "identity_mask", "attribute_mask",
              "keypoints"):  # fmt: skip
        assert b[k].dtype == torch.float32
    for k in ("target", "identity_ref", "attribute_ref"):
        assert b[k].min() >= -1 and b[k].max() <= 1
    assert b["keypoints"].min() >= 0 and b["keypoints"].max() <= 1
    assert ((b["identity_ref"] == -1) | (b["identity_mask"] == 0)).all()
    assert ((b["attribute_ref"] == -1) | (b["attribute_mask"] == 1)).all()
    assert len(b["key"]) == 4 and set(b["category"]) <= {"hair", "glasses"}
    keys = [k for batch in batches for k in batch["key"]]
    assert sorted(keys) == sorted(f"vid{s}_{c:04d}" for s in range(4) for c in range(3))


def test_ranks_see_disjoint_shards(shards: list[str]) -> None:
    seen = [
        _keys(ShardExamples(shards, CFG, rank=r, world_size=2, seed=0, epochs=1)) for r in (0, 1)
    ]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 12
    prefixes = [{k.split("_")[0] for k in s} for s in seen]
    assert not prefixes[0] & prefixes[1]  # whole shards per rank


def test_more_readers_than_shards_split_samples(shards: list[str]) -> None:
    one = shards[:1]  # 3 clips, 2 ranks: split by sample instead of by shard
    seen = [_keys(ShardExamples(one, CFG, rank=r, world_size=2, seed=0, epochs=1)) for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == ["vid0_0000", "vid0_0001", "vid0_0002"]


def test_worker_processes_split_shards(shards: list[str]) -> None:
    loader = make_loader(shards, CFG, batch_size=2, num_workers=2, rank=0, world_size=1, seed=0,
                         epochs=1)  # fmt: skip
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 12


def test_brace_pattern_resampling_and_determinism(shards: list[str]) -> None:
    pattern = str(Path(shards[0]).parent / "train-{000000..000003}.tar")
    assert expand_shards(pattern) == shards

    def first(n: int, seed: int) -> list[dict]:
        loader = make_loader(pattern, CFG, batch_size=3, num_workers=0, rank=0, world_size=1,
                             seed=seed)  # fmt: skip
        return list(islice(iter(loader), n))

    a, b = first(6, seed=1), first(6, seed=1)  # 18 examples from 12 clips: a second epoch
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        for k in ("target", "identity_ref", "identity_mask", "attribute_ref", "keypoints"):
            assert torch.equal(x[k], y[k])
    keys = [k for batch in a for k in batch["key"]]
    assert len(set(keys[:12])) == 12 and set(keys[12:]) <= set(keys[:12])
    assert keys[:12] != [k for batch in first(4, seed=2) for k in batch["key"]]
