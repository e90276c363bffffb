"""Ingest and preprocess as incremental, resumable flows (in-process, on a test Prefect server):
bad clips at the flow level, a bad video inside a batch, only new videos on a rerun, appended
shards and index parts, rebuild on change."""

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
from preprocessing.shard_index import committed_parts, read_index, read_rejected

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
    rejected = read_rejected(shards)
    by_file = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in rejected}
    assert by_file == expected
    assert all(r["detail"] for r in rejected)
    assert summary["rejected_by_reason"] == {reason: 1 for reason in expected.values()}
    index = read_index(shards)
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
    assert len(read_rejected(shards)) == len(expected)


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
    keys_before = {r["key"] for r in read_index(shards)}
    parts_before = {p: (shards / "index" / f"{p}.parquet").read_bytes()
                    for p in committed_parts(shards)}

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
    # Earlier index parts untouched; the new videos' batch added a part of its own.
    assert {p: (shards / "index" / f"{p}.parquet").read_bytes() for p in parts_before
            } == parts_before
    assert len(committed_parts(shards)) == len(parts_before) + second["batches"]
    index = read_index(shards)
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


def test_a_bad_video_in_a_batch_is_recorded_and_the_others_land(project_dir):
    """One batch of four videos: one truncated after ingest (its clips rejected with the
    reason), one whose exact-label sidecar is corrupt (the video fails, reported with its
    reason, and is tried again by the next run); the other two land."""
    from flows.ingest import ingest_flow
    from flows.preprocess import preprocess_flow

    set_params(project_dir, {**TINY, "preprocess": {"batch_videos": 4, "workers": 1}})
    raw = project_dir / "data" / "raw"
    videos = synthetic_videos(raw, 4, seed=7, n_frames=12)
    ingest_flow()
    videos[1].write_bytes(videos[1].read_bytes()[:200])  # truncated: undecodable
    sidecar = videos[2].with_suffix(".gt.npz")
    labels = sidecar.read_bytes()
    sidecar.write_bytes(b"not an npz")  # an error no rule expects: the video fails
    summary = preprocess_flow()
    assert summary["batches"] == 1 and summary["videos_failed"] == 1
    clips = read_rows(project_dir / "data" / "manifest" / "clips.parquet")
    by_video = {}
    for c in clips:
        by_video.setdefault(c["path"], set()).add(c["clip_id"])
    [(failed_id, reason)] = summary["failed"].items()
    assert failed_id in str(videos[2]) or failed_id in {c["video_id"] for c in clips
                                                         if c["path"] == str(videos[2])}
    assert reason
    shards = project_dir / "data" / "shards"
    index = {r["key"] for r in read_index(shards)}
    assert index == by_video[str(videos[0])] | by_video[str(videos[3])]
    rejected = {r["clip_id"]: r["reason"] for r in read_rejected(shards)}
    assert set(rejected) == by_video[str(videos[1])] and all(rejected.values())
    assert sorted(shard_keys(shards)) == sorted(index) and hidden_files(shards) == []
    # The failed video is tried again (and lands once its file is back); nothing redone.
    sidecar.write_bytes(labels)
    again = preprocess_flow()
    assert again["videos_processed"] == 1 and again["videos_failed"] == 0
    assert {r["key"] for r in read_index(shards)} == index | by_video[str(videos[2])]
