"""Ingest and preprocess as incremental, resumable flows (in-process, on a test Prefect server):
bad clips at the flow level, only new videos on a rerun, appended shards, rebuild on change."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import (
    TINY,
    bad_videos,
    hidden_files,
    read_rows,
    set_params,
    shard_keys,
    synthetic_videos,
)

from preprocessing import mp_models

MODELS_OK = all(v == "ok" for v in mp_models.check().values())


@pytest.mark.skipif(not MODELS_OK, reason="mediapipe models missing: run `durian fetch-models`")
def test_bad_clips_are_recorded_with_a_reason_and_the_run_goes_on(project_dir):
    from flows.ingest import ingest_flow
    from flows.preprocess import preprocess_flow

    set_params(project_dir, {**TINY, "preprocess": {"min_face_size": 64}})
    raw = project_dir / "data" / "raw"
    expected = bad_videos(raw)
    good = synthetic_videos(raw, 1, seed=5, size=256)  # exact labels: never rejected
    ingest_flow()
    summary = preprocess_flow()

    shards = project_dir / "data" / "shards"
    rejected = read_rows(shards / "rejected.parquet")
    by_file = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in rejected}
    assert by_file == expected
    assert all(r["detail"] for r in rejected)
    assert summary["rejected_by_reason"] == {reason: 1 for reason in expected.values()}
    index = read_rows(shards / "index.parquet")
    clips = read_rows(project_dir / "data" / "manifest" / "clips.parquet")
    good_ids = {c["clip_id"] for c in clips if c["path"] == str(good[0])}
    assert good_ids and {r["key"] for r in index} == good_ids
    assert sorted(shard_keys(shards)) == sorted(good_ids)
    assert hidden_files(shards) == []  # no partial shard visible
    written = json.loads((shards / "summary.json").read_text())
    assert written["rejected_by_reason"] == summary["rejected_by_reason"]
    # The synthetic video's exact labels checked the landmark parser (preprocess.parser_check).
    check = written["parser_agreement"]
    assert check["parser"] == "landmarks" and check["clips"] == len(good_ids)
    assert 0.3 < check["iou"]["skin"] <= 1.0 and 0.0 < check["miou"] < 1.0

    again = preprocess_flow()  # rejected clips are done: nothing to redo
    assert again["videos_processed"] == 0 and again["samples_added"] == 0
    assert len(read_rows(shards / "rejected.parquet")) == len(expected)


def test_rerun_ingests_only_new_videos_and_appends_shards(project_dir):
    from flows.ingest import ingest_flow
    from flows.preprocess import preprocess_flow

    set_params(project_dir, TINY)
    raw = project_dir / "data" / "raw"
    synthetic_videos(raw / "batch1", 2, seed=1)
    first_ingest = ingest_flow()
    first = preprocess_flow()
    assert first_ingest["new_videos"] == 2 and first["samples_added"] == 4
    shards = project_dir / "data" / "shards"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards.glob("*.tar")}
    keys_before = {r["key"] for r in read_rows(shards / "index.parquet")}

    synthetic_videos(raw / "batch2", 2, seed=2)
    second_ingest = ingest_flow()
    assert second_ingest["new_videos"] == 2
    assert second_ingest["skipped_known"] == 2  # known by content hash, not probed again
    videos = read_rows(project_dir / "data" / "manifest" / "videos.parquet")
    assert sum(v["status"] == "ok" for v in videos) == 4 and len(videos) == 4
    second = preprocess_flow()
    assert second["videos_skipped"] == 2 and second["videos_processed"] == 2
    assert second["samples_added"] == 4 and second["samples"] == 8

    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards.glob("*.tar")}
    assert {k: after[k] for k in before} == before  # earlier shards untouched
    new = sorted(set(after) - set(before))
    assert new == sorted(second["new_shards"])
    for split in ("train", "val"):
        old_idx = [int(n[-10:-4]) for n in before if n.startswith(split)]
        new_idx = [int(n[-10:-4]) for n in new if n.startswith(split)]
        if old_idx and new_idx:
            assert min(new_idx) > max(old_idx)  # numbered after the existing ones
    index = read_rows(shards / "index.parquet")
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys)) == 8 and keys_before < set(keys)
    assert sorted(shard_keys(shards)) == sorted(keys)
    assert {r["shard"] for r in index} == set(after)


def test_changed_preprocess_params_rebuild_the_shards(project_dir):
    from flows.ingest import ingest_flow
    from flows.preprocess import preprocess_flow

    set_params(project_dir, TINY)
    synthetic_videos(project_dir / "data" / "raw", 1, seed=3)
    ingest_flow()
    preprocess_flow()
    set_params(project_dir, {"preprocess": {"margin": 0.5}})
    rebuilt = preprocess_flow()
    assert rebuilt["videos_processed"] == 1 and rebuilt["samples"] == rebuilt["samples_added"]
    shards = project_dir / "data" / "shards"
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == sorted(rebuilt["new_shards"])  # the old set is gone, not appended to


def test_task_cache_is_dropped_once_the_index_holds_the_samples(project_dir):
    from flows.ingest import ingest_flow
    from flows.preprocess import cache_dir, preprocess_flow

    set_params(project_dir, TINY)
    synthetic_videos(project_dir / "data" / "raw", 1, seed=4)
    ingest_flow()
    before = set(cache_dir().glob("preprocess-*"))
    assert preprocess_flow()["samples_added"] == 2
    assert set(cache_dir().glob("preprocess-*")) == before  # no second copy of the shards
