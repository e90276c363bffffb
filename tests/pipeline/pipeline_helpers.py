"""Helpers for the orchestration tests: tiny projects, test videos, subprocesses, waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import matplotlib.cbook
import matplotlib.image
import numpy as np
import pyarrow.parquet as pq
import yaml
from project_helpers import make_project, project_env
from skimage import data as skdata

from preprocessing.ingest import ingest, write_parquet
from preprocessing.video import write_video
from synthetic.sample import generate_sample

# Small enough for a 2-core machine, every stage still real (cf. tests/test_pipeline_e2e.py).
TINY = {
    "ingest": {"clip_frames": 8, "min_clip_frames": 6},
    "shards": {"max_samples": 1, "val_fraction": 0.34},
    "train": {"steps": 2, "checkpoint_every": 2, "log_every": 1, "preview_every": 0},
    "evaluate": {"num_cases": 1, "cross_identity_cases": 1, "steps": 1},
}


def set_params(project: Path, sections: dict[str, dict[str, Any]]) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def tiny_project(dest: Path, **extra: dict[str, Any]) -> Path:
    project = make_project(dest)
    set_params(project, {**TINY, **extra})
    return project


def synthetic_videos(folder: Path, n: int, seed: int, n_frames: int = 16, size: int = 128
                     ) -> list[Path]:
    """``n`` synthetic portraits (exact labels in sidecars), distinct content per seed."""
    return generate_sample(folder, n_synthetic=n, n_frames=n_frames, size=size, fps=12,
                           seed=seed, real_photos=False)


def library_manifest(project: Path, videos: list[Path]) -> list[str]:
    """The ingest manifests of ``videos`` straight from the library (TINY's clip lengths), for
    tests of the later stages; returns the clip ids, sorted."""
    rows, clips = ingest([str(v) for v in videos], fps=12, clip_frames=8, min_clip_frames=6)
    write_parquet(rows, project / "data" / "manifest" / "videos.parquet", "videos")
    write_parquet(clips, project / "data" / "manifest" / "clips.parquet", "clips")
    return sorted(c["clip_id"] for c in clips)


def _portrait(image: np.ndarray, height: int) -> np.ndarray:
    w = round(image.shape[1] * height / image.shape[0])
    return cv2.resize(image, (w, height), interpolation=cv2.INTER_AREA)


def astronaut() -> np.ndarray:
    return skdata.astronaut()


def grace_hopper() -> np.ndarray:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(matplotlib.image.imread(f, format="jpg"))[..., :3].copy()


def bad_videos(folder: Path, n_frames: int = 8) -> dict[str, str]:
    """Videos a face pipeline must reject, by file name → expected reason (the tiny face is
    ~50 px: run with ``min_face_size: 64``)."""
    folder.mkdir(parents=True, exist_ok=True)
    blank = np.full((n_frames, 256, 256, 3), 127, np.uint8)
    write_video(folder / "no_face.mp4", blank, fps=12)
    two = np.concatenate([astronaut(), _portrait(grace_hopper(), 512)], axis=1)
    two = two[:, : two.shape[1] // 2 * 2]
    write_video(folder / "two_faces.mp4", np.stack([two] * n_frames), fps=12)
    canvas = np.full((512, 512, 3), 120, np.uint8)
    canvas[160:352, 160:352] = cv2.resize(astronaut(), (192, 192), interpolation=cv2.INTER_AREA)
    write_video(folder / "tiny_face.mp4", np.stack([canvas] * n_frames), fps=12)
    return {"no_face.mp4": "no_face", "two_faces.mp4": "multiple_faces",
            "tiny_face.mp4": "face_too_small"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if path.exists() else []


def shard_keys(shards_dir: Path) -> list[str]:
    """Every sample key in every visible shard (duplicates kept, to be counted)."""
    import tarfile

    keys = []
    for shard in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.extend(sorted({m.name.split(".", 1)[0] for m in tar.getmembers()}))
    return keys


def hidden_files(shards_dir: Path) -> list[str]:
    """Partial shards and temporaries, in the shard folder and its index parts' folders."""
    return sorted(str(p.relative_to(shards_dir)) for p in shards_dir.rglob(".*"))


def run(cmd: list[str], cwd: Path, timeout: int = 600, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or project_env(cwd), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str,
             poll_s: float = 0.5, proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
    """Stop a child started with ``start_new_session`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout_s)
        except ProcessLookupError:
            pass
    try:  # grandchildren that outlived the leader (Ray workers, the flow-run process)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def runs(project: Path) -> list[dict[str, Any]]:
    path = project / ".durian" / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def python() -> str:
    return sys.executable
