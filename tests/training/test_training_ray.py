"""Ray Train on a real two-node cluster on 127.0.0.1 (two ``ray start``s, 1 CPU each: one worker
per node, gloo) over real shards: the train flow with its MLflow logging and mask bank, run on
both nodes, and a worker SIGKILLed mid-run (absorbed by FailureConfig).
Every run here has the same run-defining params, so all must end with the same weights as the
uninterrupted one. (The driver stopped or SIGKILLed, and the rerun resuming at the saved step:
tests/pipeline/test_stop_late_stages.py.)
Gradient accumulation (2 micro-batches, DDP ``no_sync`` on the first) is on throughout, so the
data position of a checkpoint counts 2 batches per step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from project_helpers import ROOT
from safetensors.torch import load_file
from training_helpers import shutdown_ray, wait_for, write_train_shards

from flows.local_cluster import cluster_processes, two_node_cluster

pytestmark = pytest.mark.e2e

STEPS, EVERY = 6, 2
TRAIN = {"steps": STEPS, "checkpoint_every": EVERY, "keep_checkpoints": 2, "log_every": 1,
         "preview_every": 3, "num_workers": 2, "cpus_per_worker": 1,
         "max_failures": 1, "batch_size": 1, "grad_accum": 2}  # fmt: skip


def _write_project(project: Path, address: str, bank: Path | None = None) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(TRAIN, ray_address=address)
    params["pair"]["min_gap"] = 2
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    write_train_shards(project / "data" / "shards")
    if bank is not None:
        shutil.copy2(bank, project / "data" / "mask_bank.npz")


def _latest_step(run_dir: Path) -> int | None:
    """Ray's latest recorded step; its record (read by building Ray's checkpoint manager, in
    this process beside the driver) is read only once a checkpoint folder is there."""
    from flows.ray_adapter import latest_reported_step

    if not any(p.is_dir() for p in run_dir.glob("checkpoint_*")):
        return None
    return latest_reported_step(run_dir)


def _final_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, Path]]:
    """(address, state folder) of a two-node cluster (short path: Ray's socket names)."""
    state = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    try:
        with two_node_cluster(state, dict(os.environ)) as address:
            yield address, state
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, prefect_engine, cluster
              ) -> Iterator[dict]:
    """One uninterrupted run of the train flow (after the mask-bank flow), in-process."""
    project = tmp_path_factory.mktemp("reference") / "project"
    _write_project(project, cluster[0])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("DURIAN_PROJECT_DIR", str(project))
        mp.delenv("DURIAN_PARAMS", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        from flows.mask_bank import mask_bank_flow
        from flows.train import train_flow

        try:
            bank = mask_bank_flow()
            summary = train_flow()
            yield {"project": project, "bank": bank, "summary": summary,
                   "weights": _final_weights(summary["checkpoint"]),
                   "cluster": cluster[1]}  # fmt: skip
        finally:
            shutdown_ray()


def test_train_flow_on_two_ray_workers_logs_from_rank_zero(reference: dict) -> None:
    from mlflow.tracking import MlflowClient

    from durian.pipelines.pipeline_durian import DurianPipeline

    project, summary = reference["project"], reference["summary"]
    import ray

    assert summary["steps"] == STEPS and summary["start_step"] == 0
    # One worker on each node of the cluster (its node ids, gathered by the workers).
    assert set(summary["nodes"]) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(summary["nodes"]) == 2
    assert summary["ray_run_name"].startswith("train-s1-")
    assert reference["bank"]["counts"] == {"hair": 12, "glasses": 12}  # 6 clips x 2 frames
    info = json.loads((project / "models" / "train.json").read_text())
    assert info["mlflow_run_id"] == summary["mlflow_run_id"] and info["samples_per_s"] > 0
    model = DurianPipeline.from_pretrained(str(project / "models" / "durian")).model
    # The export is the last checkpoint's trained weights over the run's starting point.
    state = model.state_dict()
    assert _same({k: state[k] for k in reference["weights"]}, reference["weights"])
    run_dir = project / "models" / "checkpoints" / summary["ray_run_name"]
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_0000004", "checkpoint_0000006"]  # keep_checkpoints: 2

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["mask_bank"].endswith("mask_bank.npz")
    assert run.data.params["train.num_workers"] == "2"
    losses = client.get_metric_history(run.info.run_id, "loss")
    # One value per step: rank 1 logs nothing (two loggers would double every step).
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == list(
        range(1, STEPS + 1)
    )
    rates = client.get_metric_history(run.info.run_id, "samples_per_s")
    assert rates and all(m.value > 0 for m in rates)
    previews = sorted(a.path for a in client.list_artifacts(run.info.run_id, "previews"))
    assert previews == ["previews/step_0000003.png", "previews/step_0000006.png"]


def _train_workers(cluster: Path) -> list[psutil.Process]:
    found = []
    for p in cluster_processes(cluster):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(
    reference: dict, tmp_path: Path
) -> None:
    import ray

    from flows.params import load_params
    from flows.train import fit, run_name

    project = reference["project"]
    params = load_params(project / "params.yaml")
    shards = sorted(str(p) for p in (project / "data" / "shards").glob("train-*.tar"))
    bank = project / "data" / "mask_bank.npz"
    storage = tmp_path / "checkpoints"
    name = run_name(params, shards, bank)
    assert ray.is_initialized()  # the reference run's cluster
    killed: dict = {}

    def kill_a_worker_after_the_first_checkpoint() -> None:
        if not wait_for(lambda: (_latest_step(storage / name) or 0) >= EVERY, timeout=300):
            return
        workers = _train_workers(reference["cluster"])
        if workers:
            killed["step"] = _latest_step(storage / name)
            killed["pid"] = workers[-1].pid
            os.kill(workers[-1].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = fit(params, shards, storage, name, run_id=None, mask_bank=bank)
    killer.join(timeout=5)
    assert killed, "no Ray Train worker was found to kill"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == (
        psutil.STATUS_ZOMBIE
    )
    assert result.error is None  # FailureConfig(max_failures=1) absorbed it
    assert result.metrics["step"] == STEPS
    # The restarted workers began at a saved step (not 0): the one saved when the worker died,
    # or a later one if a checkpoint landed while the kill was in flight.
    assert result.metrics["start_step"] >= killed["step"] >= EVERY
    assert result.metrics["start_step"] % EVERY == 0
    assert _same(_final_weights(result.checkpoint.path), reference["weights"])
