"""Throwaway project folders for tests that run the pipeline: a copy of the pipeline
definition and code as a fresh git repo, and an environment holding no outside state."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The tracked project files a pipeline run needs (dvc.yaml names code files as deps).
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore")
PROJECT_DIRS = ("durian", "preprocessing", "synthetic", "flows", ".dvc")

STATE_VARS = ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_API_URL", "DURIAN_PROJECT_DIR",
              "DURIAN_PARAMS", "RAY_ADDRESS")


def make_project(dest: Path) -> Path:
    """Copy the pipeline definition and code into ``dest`` as a fresh git + DVC repo."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tmp", "cache")
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    env = git_env()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True, env=env)
    return dest


def git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="durian-tests",
        GIT_AUTHOR_EMAIL="tests@durian.invalid",
        GIT_COMMITTER_NAME="durian-tests",
        GIT_COMMITTER_EMAIL="tests@durian.invalid",
    )
    return env


def project_env(project: Path, prefect_api: str | None = None) -> dict[str, str]:
    """The environment for a subprocess running in ``project`` (its own state, nothing shared).

    ``prefect_api``: a Prefect server to report to (the test session's, see conftest's
    ``prefect_api_url``) instead of the temporary one each flow process would start (~5-10 s
    a process on 2 cores)."""
    env = git_env()
    for key in STATE_VARS:
        env.pop(key, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def write_clip_shards(
    directory: Path, num_shards: int, clips_per_shard: int, make_clip: Callable[[int, int], Any]
) -> list[str]:
    """``train-00000N.tar`` shards of ``make_clip(shard, clip)`` clips, keyed
    ``vid<shard>_<clip:04d>`` (one identity per clip is up to ``make_clip``)."""
    import webdataset as wds

    from durian.data.clip_codec import encode_clip

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = directory / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for c in range(clips_per_shard):
                sink.write(encode_clip(f"vid{s}_{c:04d}", make_clip(s, c)))
        paths.append(str(path))
    return paths
