"""The walking skeleton, for real: `dvc repro` of sample → ingest → preprocess → train (Ray) →
evaluate → register (MLflow) in a fresh git + DVC repo, each stage a Prefect flow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from project_helpers import make_project, project_env

from preprocessing.shard_index import read_index

pytestmark = pytest.mark.e2e

# Small enough to keep the test quick, big enough to exercise every stage for real.
PARAMS = {
    "sample": {"n_synthetic": 3, "n_frames": 16, "size": 128},
    "ingest": {"clip_frames": 8, "min_clip_frames": 6},
    "shards": {"max_samples": 4, "val_fraction": 0.34},
    # One Ray worker starts faster; two are tested in tests/training/test_training_ray.py.
    "train": {"steps": 4, "checkpoint_every": 2, "log_every": 1, "num_workers": 1},
    "evaluate": {"num_cases": 2, "cross_identity_cases": 2, "steps": 2},
}


def run(cmd: list[str], cwd: Path, timeout: int = 900, prefect_api: str | None = None
        ) -> subprocess.CompletedProcess:
    env = project_env(cwd, prefect_api=prefect_api)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def dvc(project: Path, *args: str) -> str:
    return run(["dvc", *args], project).stdout


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, prefect_api_url):
    project = make_project(tmp_path_factory.mktemp("e2e") / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    remote = project.parent / "remote"
    run(["dvc", "remote", "modify", "local", "url", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "project"], project)
    # The stages report to the session's Prefect server rather than each starting a temporary
    # one (tests/test_flows_bad_input.py runs a stage that way).
    repro = run(["durian", "run"], project, timeout=1500, prefect_api=prefect_api_url)
    return project, repro


def test_every_stage_leaves_its_artefacts(pipeline_run):
    project, _ = pipeline_run
    videos = pq.read_table(project / "data/manifest/videos.parquet").to_pylist()
    assert sum(v["status"] == "ok" for v in videos) >= 4  # real photos + synthetic portraits
    assert pq.read_table(project / "data/manifest/clips.parquet").num_rows >= 4

    shards = sorted((project / "data/shards").glob("*.tar"))
    assert shards and not list((project / "data/shards").glob(".*"))
    index = read_index(project / "data/shards")
    assert {r["shard"] for r in index} == {s.name for s in shards}
    by_video: dict[str, set[str]] = {}
    for r in index:
        by_video.setdefault(r["video_id"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in by_video.values())  # split by identity

    assert (project / "models/durian/model_index.json").exists()
    assert list((project / "models/durian/model").glob("*.safetensors"))
    train = json.loads((project / "models/train.json").read_text())
    assert train["steps"] == PARAMS["train"]["steps"]

    metrics = json.loads((project / "metrics.json").read_text())
    for key in ("l1", "psnr", "ssim", "psnr_attr", "ssim_id", "xid_psnr_attr", "xid_ssim"):
        assert key in metrics
    assert (project / "plots/preview.png").stat().st_size > 0

    registered = json.loads((project / "models/registered.json").read_text())
    assert "candidate" in registered["aliases"]
    assert "champion" in registered["aliases"]  # the first version has no champion to beat


def test_shard_samples_read_back_with_every_key_and_the_label_schema(pipeline_run):
    import webdataset as wds

    from durian.data.clip_codec import decode_clip
    from preprocessing.labels import NUM_CLASSES

    project, _ = pipeline_run
    index = {r["key"]: r for r in read_index(project / "data/shards")}
    shards = sorted(str(s) for s in (project / "data/shards").glob("*.tar"))
    seen = set()
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        assert {"frames.mp4", "parsing.npz", "landmarks.npy", "json"} <= set(sample)
        assert "." not in sample["__key__"]
        clip = decode_clip(sample)
        t, h, w, _ = clip.frames.shape
        assert (h, w) == (64, 64) and clip.parsing.shape == (t, h, w)
        assert clip.landmarks.shape == (t, 478, 3)
        assert clip.parsing.max() < NUM_CLASSES
        assert (clip.parsing == 1).any()  # every sample has face skin
        meta = clip.meta
        assert meta["parser"]["name"] in ("landmarks", "ground_truth") and meta["parser"]["version"]
        assert meta["split"] == index[sample["__key__"]]["split"]
        assert meta["video_id"] == index[sample["__key__"]]["video_id"]
        seen.add(sample["__key__"])
    assert seen == set(index)  # nothing lost, nothing extra


def test_mlflow_has_the_runs_and_the_registered_version(pipeline_run):
    project, _ = pipeline_run
    code = (
        "import mlflow, json; from mlflow import MlflowClient;"
        f"mlflow.set_tracking_uri('sqlite:///{project / 'mlflow.db'}'); c = MlflowClient();"
        "exp = c.get_experiment_by_name('durian');"
        "runs = c.search_runs([exp.experiment_id]);"
        "v = c.get_model_version_by_alias('durian', 'candidate');"
        "print(json.dumps({'runs': sorted(r.info.run_name for r in runs),"
        " 'version': v.version, 'decision': v.tags.get('promotion.decision'),"
        " 'loss_steps': len(c.get_metric_history([r for r in runs"
        "  if r.info.run_name == 'train'][0].info.run_id, 'loss'))}))"
    )
    out = json.loads(run(["python", "-c", code], project).stdout.strip().splitlines()[-1])
    assert {"train", "evaluate", "register"} <= set(out["runs"])
    assert out["decision"] == "promoted"
    assert out["loss_steps"] >= 2


def test_evaluation_reports_skips_and_logs_side_by_side_videos(pipeline_run):
    project, repro = pipeline_run
    metrics = json.loads((project / "metrics.json").read_text())
    for key in ("attr_hist_sim", "attr_crop_ssim", "xid_attr_hist_sim"):
        assert 0.0 <= metrics[key] <= 1.0
    # no metric_weights folder in the default params: skipped with the reason, not a number
    skipped = json.loads((project / "models/evaluate.json").read_text())["skipped"]
    for key in ("lpips", "fid", "fvd", "attr_clip_sim"):
        assert key not in metrics and "not set" in skipped[key]
    assert ("id_sim" in metrics) != ("id_sim" in skipped)  # measured, or said why not
    code = (
        "import mlflow, json; from mlflow import MlflowClient;"
        f"mlflow.set_tracking_uri('sqlite:///{project / 'mlflow.db'}'); c = MlflowClient();"
        "exp = c.get_experiment_by_name('durian');"
        "r = [r for r in c.search_runs([exp.experiment_id]) if r.info.run_name == 'evaluate'][0];"
        "print(json.dumps({'tags': r.data.tags,"
        " 'videos': [a.path for a in c.list_artifacts(r.info.run_id, 'videos')]}))"
    )
    out = json.loads(run(["python", "-c", code], project).stdout.strip().splitlines()[-1])
    assert out["tags"]["skipped.fid"] == skipped["fid"]
    n_cases = PARAMS["evaluate"]["num_cases"] + PARAMS["evaluate"]["cross_identity_cases"]
    assert len(out["videos"]) == n_cases and all(v.endswith(".mp4") for v in out["videos"])


def test_dvc_is_clean_and_repro_again_does_nothing(pipeline_run, prefect_api_url):
    project, _ = pipeline_run
    assert "up to date" in dvc(project, "status").lower()
    again = run(["durian", "run"], project, prefect_api=prefect_api_url).stdout
    assert "Running stage" not in again


def test_changing_one_param_reruns_only_that_stage_and_what_follows(pipeline_run,
                                                                     prefect_api_url):
    project, _ = pipeline_run
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["seed"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["durian", "run"], project, timeout=900, prefect_api=prefect_api_url).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'register'" in out
    for stage in ("sample", "ingest", "preprocess", "mask_bank", "train"):
        assert f"Running stage '{stage}'" not in out


def test_push_then_pull_into_a_second_clone_restores_the_data(pipeline_run, tmp_path):
    project, _ = pipeline_run
    dvc(project, "push")
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "pipeline outputs"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    dvc(clone, "pull")
    original = sorted(p.name for p in (project / "data/shards").glob("*.tar"))
    assert sorted(p.name for p in (clone / "data/shards").glob("*.tar")) == original
    assert (clone / "models/durian/model_index.json").exists()
