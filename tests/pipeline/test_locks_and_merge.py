"""The pieces that keep scheduled runs apart and manifests append-only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flows.locks import LockBusy, file_lock
from preprocessing.incremental import merge_clips, merge_videos, pending_clips

HOLD = """
import sys, time
from pathlib import Path
from flows.locks import file_lock
with file_lock(Path(sys.argv[1]), what="holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_lock_refuses_a_second_run_and_is_freed_when_the_holder_is_killed(tmp_path):
    path = tmp_path / "locks" / "pipeline.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy) as busy:
            with file_lock(path, timeout_s=0.5):
                pass
        assert busy.value.holder["pid"] == holder.pid
        assert json.loads(path.read_text())["what"] == "holder"
        os.kill(holder.pid, signal.SIGKILL)  # a crashed run leaves no stale lock
        holder.wait(10)
        t0 = time.monotonic()
        with file_lock(path, timeout_s=5):
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait(10)


def _video(vid, status="ok", source=None):
    return {"video_id": vid, "status": status, "source": source or f"{vid}.mp4"}


def test_merge_keeps_earlier_videos_and_retries_earlier_failures():
    earlier = [_video("a"), _video(None, "failed", "x.mp4"), _video("b")]
    new = [_video("a", "skipped_known"), _video("b", "skipped_known"), _video("c"),
           _video("x", "ok", "x.mp4")]
    merged = merge_videos(earlier, new)
    assert [(r["video_id"], r["status"]) for r in merged] == [
        ("a", "ok"), ("b", "ok"), ("c", "ok"), ("x", "ok")]
    clips = merge_clips([{"clip_id": "a_0000"}], [{"clip_id": "a_0000"}, {"clip_id": "c_0000"}])
    assert [c["clip_id"] for c in clips] == ["a_0000", "c_0000"]


def test_pending_clips_skip_indexed_and_rejected():
    clips = [{"clip_id": f"{v}_{i:04d}", "video_id": v, "clip_index": i}
             for v in ("c", "a", "b") for i in (1, 0)]
    index = [{"key": "a_0000", "shard": "train-000000.tar"},
             {"key": "a_0001", "shard": "train-000000.tar"},
             {"key": "b_0000", "shard": "train-000001.tar"}]
    rejected = [{"clip_id": "c_0000"}]
    todo = pending_clips(clips, index, rejected)
    # Only clips not done, never a done key again; videos sorted, clips in order.
    assert {v: [c["clip_id"] for c in cs] for v, cs in todo.items()} == {
        "b": ["b_0001"], "c": ["c_0001"]}
    assert list(todo) == ["b", "c"]
