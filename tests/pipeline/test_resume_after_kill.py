"""A preprocess run SIGKILLed mid-way: the rerun finishes with no duplicate and no lost sample,
and no partial shard stays visible."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from pipeline_helpers import (
    hidden_files,
    read_rows,
    run,
    shard_keys,
    synthetic_videos,
    tiny_project,
    wait_for,
)
from project_helpers import project_env

from preprocessing.ingest import ingest, write_parquet

pytestmark = pytest.mark.e2e


def test_rerun_after_sigkill_mid_preprocess_loses_and_duplicates_nothing(tmp_path):
    project = tiny_project(tmp_path / "project", preprocess={"workers": 1})
    videos = synthetic_videos(project / "data" / "raw", 12, seed=11)
    # The manifest straight from the library (the ingest flow is tested elsewhere).
    rows, clips = ingest([str(v) for v in videos], fps=12, clip_frames=8, min_clip_frames=6)
    write_parquet(rows, project / "data" / "manifest" / "videos.parquet", "videos")
    write_parquet(clips, project / "data" / "manifest" / "clips.parquet", "clips")
    expected = sorted(c["clip_id"] for c in clips)
    assert len(expected) == 24

    shards = project / "data" / "shards"
    index = shards / "index.parquet"
    proc = subprocess.Popen(["python", "-m", "flows.preprocess"], cwd=project,
                            env=project_env(project), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # One sample per shard: the index grows clip by clip. Kill once some are written.
        wait_for(lambda: len(read_rows(index)) >= 2 if index.exists() else False, 300,
                 "the first shards", poll_s=0.02, proc=proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_at_kill = read_rows(index)
    assert 2 <= len(done_at_kill) < len(expected), "the run ended before it could be killed"

    out = run(["python", "-m", "flows.preprocess"], project).stdout
    assert "skipped (done)" in out
    rows = read_rows(index)
    keys = [r["key"] for r in rows]
    assert sorted(keys) == expected  # nothing lost, nothing twice in the index
    assert sorted(shard_keys(shards)) == expected  # nor in the shards themselves
    assert {r["shard"] for r in rows} == {p.name for p in shards.glob("*.tar")}
    assert hidden_files(shards) == []
    assert {r["key"] for r in done_at_kill} <= set(keys)
