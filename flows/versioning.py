"""Dataset versioning and run provenance: DVC when the project is a DVC repo, a content hash of
the shard index otherwise; the git revision. Below :mod:`flows.mlflow_adapter`, which tags its runs
with :func:`provenance_tags` (so nothing here imports it).

Only :mod:`flows.pipeline` (the served flow) calls ``dvc``: under ``dvc repro`` DVC itself
records the outputs, and a stage calling ``dvc commit`` inside a repro would fight over DVC's
repository lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flows.env import project_dir
from flows.project import paths
from preprocessing.incremental import index_digest
from preprocessing.shard_index import has_index, read_index


def git_revision(root: Path | None = None) -> str | None:
    """``HEAD``'s commit, with ``-dirty`` when tracked files differ from it; None outside git."""
    root = root or project_dir()
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=30)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dataset_hash(root: Path | None = None) -> str | None:
    """Content hash of the shard set (index keys, shard names and sizes); None without one."""
    p = paths(root)
    if not has_index(p.shards):
        return None
    return index_digest(read_index(p.shards), p.shards)


def is_dvc_repo(root: Path | None = None) -> bool:
    root = root or project_dir()
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def _dvc(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True,
                          text=True, timeout=timeout)


def dvc_out_md5(root: Path, stage: str, out: str) -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for ``out`` of ``stage``."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    for entry in data.get("stages", {}).get(stage, {}).get("outs", []):
        if entry.get("path") == out:
            return entry.get("md5")
    return None


def record_version(stages: list[str], push: bool = True, root: Path | None = None
                   ) -> dict[str, Any]:
    """Record what the pipeline just produced: ``dvc commit`` of ``stages`` (and ``dvc push``
    to the default remote when one is set) in a DVC repo; always the shard-index hash and the
    git revision. Appends the record to ``.durian/dataset_versions.jsonl``. Never raises for a
    DVC failure: the record says what went wrong (a scheduled run must still train)."""
    root = root or project_dir()
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stages": stages,
        "dataset_hash": dataset_hash(root),
        "git_revision": git_revision(root),
        "dvc": is_dvc_repo(root),
    }
    if record["dvc"] and stages:
        commit = _dvc(root, "commit", "--force", *stages)
        record["dvc_commit"] = "ok" if commit.returncode == 0 else commit.stderr.strip()[-500:]
        record["dvc_shards_md5"] = dvc_out_md5(root, "preprocess", "data/shards")
        remote = _dvc(root, "remote", "default")
        if push and commit.returncode == 0 and remote.returncode == 0 and remote.stdout.strip():
            pushed = _dvc(root, "push", *stages)
            record["dvc_push"] = ("ok" if pushed.returncode == 0
                                  else pushed.stderr.strip()[-500:])
            record["dvc_remote"] = remote.stdout.strip()
    log = root / ".durian" / "dataset_versions.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return record


def provenance_tags(root: Path | None = None) -> dict[str, str]:
    """Tags for an MLflow run: the git revision and the dataset version it saw.

    ``flows.mlflow_adapter.start_run`` sets them on every run, so that runs under ``dvc repro``
    carry them (the served pipeline also sets them on its train/evaluate runs afterwards)."""
    root = root or project_dir()
    tags = {"git_revision": git_revision(root) or "", "dataset_hash": dataset_hash(root) or ""}
    md5 = dvc_out_md5(root, "preprocess", "data/shards")
    if md5:
        tags["dataset_dvc_md5"] = md5
    return tags
