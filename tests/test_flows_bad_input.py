"""Bad input at the pipeline's front door: each gets a clear message and loses nothing done."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from preprocessing.video import write_video


def _set_params(project, **sections) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params))


def _video(path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    write_video(path, frames, fps=12)


def test_missing_source_folder_is_a_clear_error(project_dir):
    from flows.ingest import ingest_flow

    _set_params(project_dir, source={"kind": "folder", "path": "no/such/folder"})
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        ingest_flow()


def test_empty_source_is_a_clear_error(project_dir):
    from flows.ingest import ingest_flow

    (project_dir / "data" / "raw").mkdir(parents=True)
    with pytest.raises((ValueError, FileNotFoundError), match="(?i)no video"):
        ingest_flow()


def test_unreadable_video_is_recorded_and_the_others_go_on(project_dir):
    from flows.ingest import ingest_flow

    raw = project_dir / "data" / "raw"
    raw.mkdir(parents=True)
    _video(raw / "a.mp4", 0)
    _video(raw / "b.mp4", 1)
    (raw / "broken.mp4").write_bytes(b"this is not a video at all")
    summary = ingest_flow()
    assert summary["ok"] == 2 and summary["failed"] == 1
    videos = pq.read_table(project_dir / "data" / "manifest" / "videos.parquet").to_pylist()
    broken = [v for v in videos if v["path"].endswith("broken.mp4")]
    assert broken[0]["status"] == "failed" and broken[0]["reason"]
    clips = pq.read_table(project_dir / "data" / "manifest" / "clips.parquet").to_pylist()
    assert {c["video_id"] for c in clips} == {v["video_id"] for v in videos if v["status"] == "ok"}


def test_unknown_param_key_fails_in_one_line_and_keeps_outputs(project_dir):
    raw = project_dir / "data" / "raw"
    raw.mkdir(parents=True)
    _video(raw / "a.mp4")
    manifest = project_dir / "data" / "manifest"
    manifest.mkdir(parents=True)
    (manifest / "videos.parquet").write_bytes(b"earlier result")
    _set_params(project_dir, ingest={"clip_framez": 4})
    proc = subprocess.run(
        [sys.executable, "-m", "flows.ingest"], cwd=project_dir, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {project_dir / 'params.yaml'}: ingest.clip_framez: unknown key"]
    assert (manifest / "videos.parquet").read_bytes() == b"earlier result"
