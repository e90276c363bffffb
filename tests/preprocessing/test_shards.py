"""Split assignment and shard writing (rollover, append, parts, crash safety)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from durian.data.clip_codec import Clip, decode_clip, encode_clip
from preprocessing.shards import (
    ShardWriter,
    assign_split,
    clean_partial_shards,
    list_shards,
    next_shard_index,
)

ROOT = Path(__file__).resolve().parents[2]


def sample(key: str, size: int = 100, num_frames: int = 4) -> dict:
    payload = hashlib.sha256(key.encode()).digest() * (size // 32 + 1)
    meta = json.dumps({"num_frames": num_frames}).encode()
    return {"__key__": key, "bin": payload[:size], "json": meta}


def keys_in(shards: list[str]) -> list[str]:
    return [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_assign_split_deterministic_by_video() -> None:
    ids = [f"{i:016x}" for i in range(2000)]
    splits = [assign_split(v, 0.2) for v in ids]
    assert splits == [assign_split(v, 0.2) for v in ids]
    assert 0.17 < splits.count("val") / len(ids) < 0.23
    assert splits != [assign_split(v, 0.2, seed=1) for v in ids]
    assert {assign_split(v, 0.0) for v in ids} == {"train"}
    assert {assign_split(v, 1.0) for v in ids} == {"val"}
    with pytest.raises(ValueError):
        assign_split("x", 1.5)


def test_rollover_by_count_and_real_clip_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clip = Clip(
        rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8),
        rng.integers(0, 19, (2, 16, 16), dtype=np.uint8),
        rng.random((2, 478, 3), dtype=np.float32),
        {"fps": 25.0, "num_frames": 2},
    )
    with ShardWriter(tmp_path, max_count=3) as w:
        names = [w.write(sample(f"abc_{i:04d}")) for i in range(6)]
        names.append(w.write(encode_clip("abc_0006", clip)))
        # The open shard is invisible until complete; rolled-over ones are already in place.
        visible = [Path(s).name for s in list_shards(tmp_path)]
        assert visible == ["train-000000.tar", "train-000001.tar"]
    assert names == ["train-000000.tar"] * 3 + ["train-000001.tar"] * 3 + ["train-000002.tar"]
    assert [r["shard"] for r in w.records] == names
    assert w.records[0] == {
        "key": "abc_0000", "split": "train", "shard": "train-000000.tar",
        "video_id": "abc", "clip_index": 0, "num_frames": 4,
    }  # fmt: skip
    shards = list_shards(tmp_path)
    assert [Path(s).name for s in shards] == sorted(set(names)) and shards == w.shards
    assert keys_in(shards) == [f"abc_{i:04d}" for i in range(7)]
    last = next(iter(wds.WebDataset(shards[-1:], shardshuffle=False)))
    back = decode_clip(last)
    np.testing.assert_array_equal(back.frames, clip.frames)  # crf 0: lossless
    np.testing.assert_array_equal(back.parsing, clip.parsing)


def test_rollover_by_bytes_and_splits(tmp_path: Path) -> None:
    max_bytes = 40_000
    with ShardWriter(tmp_path, max_count=1000, max_bytes=max_bytes) as w:
        for i in range(20):
            split = "val" if i % 5 == 0 else "train"
            w.write(sample(f"v{i % 3}_{i:04d}", size=3000 + 500 * i), split=split)
        w.write(sample("huge_0000", size=100_000))  # bigger than a shard: alone in one
    for shard in list_shards(tmp_path):
        size = os.path.getsize(shard)
        assert size <= max_bytes or keys_in([shard]) == ["huge_0000"]
    assert len(list_shards(tmp_path, "train")) > 2
    assert keys_in(list_shards(tmp_path, "val")) == [f"v{i % 3}_{i:04d}" for i in (0, 5, 10, 15)]
    by_shard: dict[str, list[str]] = {}
    for r in w.records:
        by_shard.setdefault(r["shard"], []).append(r["key"])
    for shard in list_shards(tmp_path):
        assert keys_in([shard]) == by_shard[Path(shard).name]


def test_second_run_appends_without_touching_existing(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_count=2) as w:
        for i in range(3):
            w.write(sample(f"a_{i:04d}"))
    before = {s: (digest(s), os.stat(s).st_mtime_ns) for s in list_shards(tmp_path)}
    assert next_shard_index(tmp_path, "train") == 2 and next_shard_index(tmp_path, "val") == 0
    with ShardWriter(tmp_path, max_count=2) as w2:
        assert w2.write(sample("b_0000")) == "train-000002.tar"
        assert w2.write(sample("b_0001"), split="val") == "val-000000.tar"
    assert {s: (digest(s), os.stat(s).st_mtime_ns) for s in before} == before
    assert [Path(s).name for s in list_shards(tmp_path, "train")] == [
        f"train-{i:06d}.tar" for i in range(3)
    ]


def test_same_samples_give_identical_shards(tmp_path: Path) -> None:
    for run in ("a", "b"):
        with ShardWriter(tmp_path / run) as w:
            for i in range(3):
                w.write(sample(f"k_{i:04d}"))
    assert digest(list_shards(tmp_path / "a")[0]) == digest(list_shards(tmp_path / "b")[0])


def test_killed_run_leaves_only_a_partial_that_is_cleaned(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_count=2) as w:
        w.write(sample("done_0000"))
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from preprocessing.shards import ShardWriter
        w = ShardWriter({str(tmp_path)!r}, max_count=2)
        for i in range(3):
            w.write({{"__key__": f"killed_{{i:04d}}", "bin": b"x" * 1000}})
        os._exit(1)  # dies like a killed worker: no close, no cleanup
        """
    )
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    # The first shard of that run was complete and renamed; the second was not.
    names = [Path(s).name for s in list_shards(tmp_path)]
    assert names == ["train-000000.tar", "train-000001.tar"]
    partials = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert partials == [".train-000002.tar.partial"]
    assert next_shard_index(tmp_path, "train") == 2
    assert clean_partial_shards(tmp_path) == [str(tmp_path / ".train-000002.tar.partial")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_exception_discards_open_shards(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, max_count=2) as w:
        for i in range(3):
            w.write(sample(f"x_{i:04d}"))
        raise RuntimeError("preprocessing failed")
    assert [Path(s).name for s in list_shards(tmp_path)] == ["train-000000.tar"]
    assert [r["key"] for r in w.records] == ["x_0000", "x_0001"]
    assert list(tmp_path.iterdir()) == [tmp_path / "train-000000.tar"]


def test_bad_samples_rejected(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="without dots"):
            w.write({"__key__": "a.b_0001", "bin": b"x"})
        with pytest.raises(TypeError):
            w.write({"__key__": "a_0001", "npy": np.zeros(3)})
        with pytest.raises(ValueError):
            w.write(sample("a_0001"), split="train-x")
    assert list_shards(tmp_path) == []


def test_parts_number_their_shards_apart(tmp_path: Path) -> None:
    """Writers of different parts share a folder; each part numbers its own shards."""
    with ShardWriter(tmp_path, max_count=1, part="pa1") as a, \
            ShardWriter(tmp_path, max_count=1, part="pb2") as b:
        for i in range(2):
            a.write(sample(f"a_{i:04d}"))
            b.write(sample(f"b_{i:04d}"))
    assert [Path(s).name for s in list_shards(tmp_path)] == [
        "train-pa1-000000.tar", "train-pa1-000001.tar",
        "train-pb2-000000.tar", "train-pb2-000001.tar"]
    assert [Path(s).name for s in list_shards(tmp_path, part="pb2")] == [
        "train-pb2-000000.tar", "train-pb2-000001.tar"]
    assert next_shard_index(tmp_path, "train", "pa1") == 2
    assert next_shard_index(tmp_path, "train") == 0  # no part-less shard yet
    with pytest.raises(ValueError, match="lower-case"):
        ShardWriter(tmp_path, part="Bad-Part")
