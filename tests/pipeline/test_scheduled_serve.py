"""Issue 9 end to end: a real ``prefect server`` on 127.0.0.1, the pipeline served on a short
interval by ``python -m flows.serve serve`` (what ``durian serve`` runs) in a fresh project.

Run 1 is SIGKILLed mid-preprocess; the next scheduled run completes its work with no duplicate.
New videos then land in the source folder; the run after that ingests only them, appends
shards, fine-tunes from @champion, registers a new version and moves the alias by the rule."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pipeline_helpers import (
    free_port,
    kill_group,
    read_rows,
    run,
    runs,
    shard_keys,
    synthetic_videos,
    tiny_project,
    wait_for,
)
from project_helpers import project_env

from preprocessing.shard_index import read_index

pytestmark = pytest.mark.e2e


def _post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _completed(project: Path) -> list[dict]:
    return [r for r in runs(project) if r["status"] == "completed"]


def _registry(project: Path) -> dict:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    c = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    try:
        # The sqlite store hands back an int here, the REST store a str: compare as str.
        champion = str(c.get_model_version_by_alias("durian", "champion").version)
    except MlflowException:
        champion = None
    train = c.get_run(json.loads((project / "models" / "train.json").read_text())[
        "mlflow_run_id"])
    return {"champion": champion, "train_tags": train.data.tags,
            "versions": sorted(int(v.version) for v in c.search_model_versions("name='durian'"))}


def test_served_pipeline_resumes_a_killed_run_and_picks_up_new_videos(tmp_path):
    project = tiny_project(tmp_path / "project", source={"kind": "folder", "path": "incoming"},
                           train={"steps": 2, "checkpoint_every": 2, "log_every": 1,
                                  "preview_every": 0, "retrain": "finetune",
                                  # Two workers are tested elsewhere; one starts faster.
                                  "num_workers": 1},
                           # A batch per video, so the kill below lands between commits.
                           preprocess={"batch_videos": 1})
    run(["dvc", "remote", "modify", "local", "url", str(tmp_path / "dvc-remote")], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "project"], project)
    synthetic_videos(project / "incoming" / "batch1", 4, seed=21)
    staged = synthetic_videos(tmp_path / "staging" / "batch2", 2, seed=22)
    assert len(staged) == 2

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = project_env(project) | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 120, "the Prefect server", proc=server)
        serve_log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
        serve = subprocess.Popen(
            ["python", "-m", "flows.serve", "serve", "--interval", "10"], cwd=project,
            env=env | {"PREFECT_API_URL": api}, stdout=serve_log, stderr=subprocess.STDOUT,
            start_new_session=True)

        # Run 1: SIGKILL the flow-run process (the pipeline lock's holder) mid-preprocess.
        shards = project / "data" / "shards"
        wait_for(lambda: len(read_index(shards)) >= 1, 240,
                 "run 1 to start writing shards", poll_s=0.05, proc=serve)
        lock = json.loads((project / ".durian" / "locks" / "pipeline.lock").read_text())
        assert lock["pid"] != serve.pid  # a run lives in its own process
        os.kill(lock["pid"], signal.SIGKILL)
        at_kill = len(read_index(shards))
        clips = read_rows(project / "data" / "manifest" / "clips.parquet")
        assert at_kill < len(clips) == 8

        # Run 2 (the next scheduled one) finishes the work: every clip once, a model v1.
        first = wait_for(lambda: _completed(project), 420, "a completed run", proc=serve)[0]
        # New videos arrive right away: the next run sees them (moved in atomically).
        shutil.move(str(tmp_path / "staging" / "batch2"), project / "incoming" / "batch2")
        assert first["samples"] == 8 and first["new_videos"] == 0
        assert first["samples_added"] == 8 - at_kill
        assert first["model_version"] == "1" and "candidate" in first["aliases"]
        assert ("champion" in first["aliases"]) == first["promoted"]  # the rule decides
        champion_before = _registry(project)["champion"]
        keys = [r["key"] for r in read_index(shards)]
        assert sorted(keys) == sorted(c["clip_id"] for c in clips)
        assert sorted(shard_keys(project / "data" / "shards")) == sorted(keys)
        shards_after_first = first["shards"]

        # Run 3: only the new videos, appended shards, fine-tuned, v2, alias by the rule.
        second = wait_for(lambda: _completed(project)[1:], 420, "a second completed run",
                          proc=serve)[0]
        assert second["new_videos"] == 2 and second["known_videos"] == 4
        assert second["samples_added"] == 4 and second["samples"] == 12
        assert second["shards"] > shards_after_first
        assert second["model_version"] == "2"
        if champion_before:  # fine-tuned from @champion when there is one
            assert f"champion/v{champion_before}/" in (second["init_from"] or "")
            assert (Path(second["init_from"]) / "model_index.json").exists()
        reg = _registry(project)
        assert reg["versions"] == [1, 2]
        assert reg["champion"] == ("2" if second["promoted"] else champion_before)
        assert reg["train_tags"]["dataset_hash"] == second["dataset_hash"]
        assert reg["train_tags"]["git_revision"]
        assert second["dataset_dvc_md5"]  # dvc commit recorded the shards in dvc.lock
        assert list((tmp_path / "dvc-remote").rglob("*"))  # and dvc push sent them

        # Prefect saw it all: a crashed run, completed ones, a summary artifact per run.
        crashed = _post(api, "/flow_runs/filter", {
            "flow_runs": {"state": {"type": {"any_": ["CRASHED"]}}}})
        assert crashed
        artifacts = _post(api, "/artifacts/filter",
                          {"artifacts": {"key": {"any_": ["durian-run-summary"]}}})
        assert len(artifacts) >= 2 and "new_videos" in artifacts[0]["data"]
    finally:
        if serve is not None:
            kill_group(serve)
        kill_group(server)
