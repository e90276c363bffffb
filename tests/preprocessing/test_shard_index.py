"""The append-only shard index: parts committed whole, read as one table, and a writer killed
(SIGKILL) at several points of a batch loses only the batch in flight and duplicates nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset as wds

from preprocessing.ingest import write_parquet
from preprocessing.shard_index import (
    INDEX_DIR,
    INDEX_SCHEMA,
    REJECTED_DIR,
    REJECTED_SCHEMA,
    clean_uncommitted,
    commit_part,
    committed_parts,
    committed_shards,
    part_name,
    read_index,
    read_rejected,
    write_part,
)
from preprocessing.shards import list_shards

ROOT = Path(__file__).resolve().parents[2]
VIDEOS = [f"v{i:02d}" for i in range(8)]
CLIPS = [{"clip_id": f"{v}_{c:04d}", "video_id": v, "clip_index": c, "path": f"/x/{v}.mp4"}
         for v in VIDEOS for c in range(3)]
# Every clip with index 2 of an odd video is rejected; the rest become samples.
REJECTED = {c["clip_id"] for c in CLIPS if c["clip_index"] == 2 and int(c["video_id"][1:]) % 2}


def _sample(key: str) -> dict:
    return {"__key__": key, "bin": key.encode() * 50, "json": b'{"num_frames": 4}'}


def _result(clips: list[dict]) -> dict:
    return {
        "samples": [{"split": "val" if c["video_id"] == "v03" else "train",
                     "sample": _sample(c["clip_id"])}
                    for c in clips if c["clip_id"] not in REJECTED],
        "rejected": [{"clip_id": c["clip_id"], "video_id": c["video_id"], "path": c["path"],
                      "reason": "no_face", "detail": "test"}
                     for c in clips if c["clip_id"] in REJECTED],
    }


# A pipeline run in miniature: pending clips (the flow's rule) in batches of 2 videos, one
# part each, one sample every DELAY seconds so the parent can kill it where it wants.
RUN = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from preprocessing.incremental import pending_clips
    from preprocessing.shard_index import (
        clean_uncommitted, part_name, read_index, read_rejected, write_part)
    from test_shard_index import CLIPS, _result

    folder = {folder!r}
    clean_uncommitted(folder)
    pending = pending_clips(CLIPS, read_index(folder), read_rejected(folder))
    vids = list(pending)
    for start in range(0, len(vids), 2):
        videos = {{v: pending[v] for v in vids[start:start + 2]}}
        part = part_name(c["clip_id"] for cs in videos.values() for c in cs)

        def results(videos=videos):
            for clips in videos.values():
                time.sleep({delay})
                yield _result(clips)

        write_part(folder, part, results(), max_count=2, max_bytes=1 << 20, worker="w")
    print("done")
    """
)


def _run(folder: Path, until: Callable[[], bool] | None, delay: float = 0.12) -> str:
    """Run the miniature pipeline; SIGKILL it as soon as ``until()`` holds (None: to the end)."""
    script = RUN.format(root=str(ROOT), tests=str(Path(__file__).parent), folder=str(folder),
                        delay=delay)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while until is not None and proc.poll() is None and time.monotonic() < deadline:
        if until():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "done" in out, out
    return "finished"


def _partials(folder: Path) -> list[Path]:
    return list(folder.glob(".*.partial"))


def _uncommitted_tars(folder: Path) -> list[str]:
    listed = {r["shard"] for r in read_index(folder)}
    return [p for p in list_shards(folder) if Path(p).name not in listed]


def _check_consistent(folder: Path) -> set[str]:
    """After clean-up: every shard listed, holding exactly the keys the index says, once."""
    clean_uncommitted(folder)
    index = read_index(folder)
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys))
    shards = list_shards(folder)
    assert {Path(s).name for s in shards} == {r["shard"] for r in index}
    in_tars = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)] if shards else []
    assert sorted(in_tars) == sorted(keys)
    assert not _partials(folder)
    rejected = [r["clip_id"] for r in read_rejected(folder)]
    assert len(rejected) == len(set(rejected)) and set(rejected) <= REJECTED
    return set(keys)


def test_parts_commit_whole_and_read_as_one_table(tmp_path: Path) -> None:
    a = [c for c in CLIPS if c["video_id"] in ("v00", "v03")]
    b = [c for c in CLIPS if c["video_id"] == "v01"]
    rec_a = write_part(tmp_path, part_name(c["clip_id"] for c in a), [_result(a)],
                       max_count=2, max_bytes=1 << 20, worker="node-a")
    rec_b = write_part(tmp_path, part_name(c["clip_id"] for c in b), iter([_result(b)]),
                       max_count=2, max_bytes=1 << 20, worker="node-b")
    assert rec_a["samples"] == 5 and rec_b["samples"] == 2 and len(rec_b["rejected"]) == 1
    assert committed_parts(tmp_path) == {rec_a["part"], rec_b["part"]}
    rows = read_index(tmp_path)
    assert sorted(r["key"] for r in rows) == sorted(
        c["clip_id"] for c in a + b if c["clip_id"] not in REJECTED)
    assert {r["worker"] for r in rows} == {"node-a", "node-b"}
    assert {r["split"] for r in rows if r["video_id"] == "v03"} == {"val"}
    assert [Path(s).name for s in committed_shards(tmp_path, "val")] == [
        f"val-{rec_a['part']}-000000.tar"]  # v03's two samples (its third is rejected)
    # A retry of a committed part (its first try finished, its record was lost) reads the
    # record back and writes nothing.
    before = sorted(p.name for p in tmp_path.rglob("*"))
    again = write_part(tmp_path, rec_b["part"], iter(()), max_count=2, max_bytes=1 << 20)
    assert again == rec_b and sorted(p.name for p in tmp_path.rglob("*")) == before
    # Parts with the same key twice never commit.
    with pytest.raises(ValueError, match="duplicate keys"):
        commit_part(tmp_path, "pdup", rows[:1] * 2)
    assert "pdup" not in committed_parts(tmp_path)
    assert (tmp_path / INDEX_DIR / f"{rec_a['part']}.parquet").is_file()
    assert read_index(tmp_path / "nothing") == [] and read_rejected(tmp_path / "nothing") == []


def test_a_failing_batch_leaves_nothing(tmp_path: Path) -> None:
    def results():
        yield _result([c for c in CLIPS if c["video_id"] == "v00"])
        raise RuntimeError("the worker failed mid-batch")

    with pytest.raises(RuntimeError, match="mid-batch"):
        write_part(tmp_path, "pfail", results(), max_count=1, max_bytes=1 << 20)
    assert list_shards(tmp_path) == [] and not _partials(tmp_path)
    assert committed_parts(tmp_path) == set() and read_rejected(tmp_path) == []


def test_killed_at_several_points_the_rerun_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    kept: set[str] = set()
    # 1. Mid-way through the first shard of the first batch (a .partial, nothing committed).
    assert _run(folder, lambda: bool(_partials(folder))) == "killed"
    assert committed_parts(folder) == set()
    assert _check_consistent(folder) == set()
    # 2. A batch has finished a shard but not yet committed: complete yet unlisted tars.
    assert _run(folder, lambda: bool(_uncommitted_tars(folder))) == "killed"
    assert _uncommitted_tars(folder)  # what the kill left for the clean-up
    kept = _check_consistent(folder)
    # 3. After a commit, with the next batch in flight.
    assert _run(folder, lambda: len(committed_parts(folder)) >= 1 and bool(_partials(folder))
                ) == "killed"
    at_third = _check_consistent(folder)
    assert kept <= at_third and at_third
    # 4. The window between a part's rejections and its index part (too short to hit with a
    # signal): rejections of an uncommitted part and an index temporary are cleaned up.
    write_parquet([{"clip_id": "v07_0002", "video_id": "v07", "path": "/x/v07.mp4",
                    "reason": "no_face", "detail": "orphan"}],
                  folder / REJECTED_DIR / "pzzz.parquet", REJECTED_SCHEMA)
    write_parquet([], folder / INDEX_DIR / ".pzzz.parquet.1.tmp", INDEX_SCHEMA)
    assert "v07_0002" not in {r["clip_id"] for r in read_rejected(folder)}
    removed = clean_uncommitted(folder)
    assert removed["rejected"] == 1 and not list((folder / INDEX_DIR).glob(".*"))
    # The rerun finishes: every clip done exactly once, nothing left over.
    assert _run(folder, None, delay=0.0) == "finished"
    keys = _check_consistent(folder)
    assert at_third <= keys
    assert keys == {c["clip_id"] for c in CLIPS} - REJECTED
    assert {r["clip_id"] for r in read_rejected(folder)} == REJECTED
    assert len(committed_parts(folder)) >= 4  # one part per batch of 2 of the 8 videos
