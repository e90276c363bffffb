"""Throwaway project folders for tests that run the pipeline: a copy of the pipeline
definition and code as a fresh git repo, and an environment holding no outside state."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tracked project files a pipeline run needs (dvc.yaml names code files as deps).
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore")
PROJECT_DIRS = ("durian", "preprocessing", "flows", ".dvc")

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


def project_env(project: Path) -> dict[str, str]:
    """The environment for a subprocess running in ``project`` (its own state, nothing shared)."""
    env = git_env()
    for key in STATE_VARS:
        env.pop(key, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
