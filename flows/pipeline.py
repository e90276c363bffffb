"""The whole pipeline as one Prefect flow: each stage's flow runs as a subflow, in order.

``durian run`` normally runs the same stages through DVC (``dvc repro``) so that only what
changed reruns; this flow is what a Prefect deployment serves (``durian serve``). Each stage is
incremental, so a scheduled run does only the new work: ingest probes only new videos,
preprocess appends shards for new clips (and finishes what a crashed run left), train and the
rest run on the grown dataset.

One run at a time: the flow holds ``.durian/locks/pipeline.lock`` (a kernel file lock, freed
when its process dies, SIGKILL included); a run that finds it held is skipped (or waits
``schedule.lock_timeout_s``). After preprocess the dataset version is recorded (DVC commit +
push in a DVC repo, a content hash otherwise); at the end the outcome goes to the flow log, a
Prefect markdown artifact (key ``durian-run-summary``) and ``.durian/runs.jsonl``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.env import environ_set
from flows.locks import LockBusy, file_lock, lock_path
from flows.project import STAGES, params_path, paths, read_params

ARTIFACT_KEY = "durian-run-summary"


def source_override(source: str) -> dict[str, str]:
    """``source`` params for a path given to the deployment: a folder, a glob or a manifest."""
    if any(ch in source for ch in "*?["):
        return {"kind": "glob", "path": source}
    if Path(source).suffix.lower() in (".csv", ".parquet"):
        return {"kind": "manifest", "path": source}
    return {"kind": "folder", "path": source}


@contextlib.contextmanager
def run_params(overrides: dict[str, dict[str, Any]]) -> Iterator[Path]:
    """Point every stage at a params file = the chosen file + ``overrides`` (validated)."""
    from flows.params import parse_params, with_overrides

    base = params_path()
    if not overrides:
        yield base
        return
    data = with_overrides(yaml.safe_load(base.read_text()), overrides)
    parse_params(data, origin=f"{base} + deployment parameters")
    derived = paths().root / ".durian" / "run-params.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    derived.write_text(yaml.safe_dump(data, sort_keys=False))
    with environ_set("DURIAN_PARAMS", str(derived)):
        yield derived


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def run_outcome(results: dict[str, Any], version: dict[str, Any] | None) -> dict[str, Any]:
    """The facts a scheduled run is judged by, from the stages' own records."""
    p = paths()
    out: dict[str, Any] = {"stages": list(results)}
    if "ingest" in results:
        ing = results["ingest"]
        out |= {"new_videos": ing.get("new_videos", 0), "known_videos": ing.get("skipped_known", 0),
                "failed_videos": ing.get("failed", 0), "ingest_failed_by_reason":
                ing.get("failed_by_reason", {})}
    if "preprocess" in results:
        pre = results["preprocess"]
        out |= {k: pre[k] for k in ("samples_added", "shards_added", "samples", "shards",
                                    "rejected_added", "rejected_by_reason", "videos_failed")}
    if version:
        out["dataset_hash"] = version.get("dataset_hash")
        out["dataset_dvc_md5"] = version.get("dvc_shards_md5")
        out["git_revision"] = version.get("git_revision")
    if "train" in results:
        out["final_loss"] = results["train"].get("final_loss")
        out["train_run_id"] = results["train"].get("mlflow_run_id")
    if "evaluate" in results:
        out["metrics"] = _json(p.metrics)
    if "register" in results:
        reg = results["register"]
        out |= {"model_version": reg.get("version"), "aliases": reg.get("aliases"),
                "promoted": reg.get("promoted"), "promotion_reason": reg.get("reason")}
    return out


def markdown(outcome: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |"
                     for k, v in outcome.items())
    head = outcome.get("status", "completed")
    return f"# durian pipeline run: {head}\n\n| what | value |\n|---|---|\n{rows}\n"


def _record(outcome: dict[str, Any]) -> None:
    log = paths().root / ".durian" / "runs.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(outcome, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def not_fatal(what: str, log: Any) -> Iterator[None]:
    """Run a step that only reports (a summary artifact, provenance tags): its failure is logged
    as a warning with its cause (``log``: a logger) and does not turn a good run into a failed
    one."""
    try:
        yield
    except Exception as err:  # any cause: the run's own work is done and recorded already
        log.warning("%s failed (the run goes on): %s: %s", what, type(err).__name__, err)


def _report(outcome: dict[str, Any]) -> None:
    log = get_run_logger()
    log.info("pipeline outcome: %s", json.dumps(outcome, default=str))
    _record(outcome)
    with not_fatal(f"the run-summary artifact {ARTIFACT_KEY!r}", log):
        create_markdown_artifact(markdown=markdown(outcome), key=ARTIFACT_KEY,
                                 description="durian scheduled run: data, model, promotion")


def _run_stages(chosen: list[str], version_data: bool) -> tuple[dict, dict | None]:
    from flows.mlflow_adapter import tag_runs
    from flows.versioning import provenance_tags, record_version

    log = get_run_logger()
    results: dict[str, Any] = {}
    version = None
    for name in STAGES:
        if name not in chosen:
            continue
        stage_flow = getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")
        results[name] = stage_flow()
        if name == "preprocess" or (name == "ingest" and "preprocess" not in chosen):
            data_stages = [s for s in ("sample", "ingest", "preprocess") if s in chosen]
            version = record_version(data_stages, push=True) if version_data else None
            log.info("dataset version: %s", version)
    done = [s for s in ("train", "evaluate", "register") if s in results]
    if done and version_data:
        record_version(done, push=True)
    run_ids = [_json(paths().train_info).get("mlflow_run_id") if "train" in results else None,
               _json(paths().root / "models" / "evaluate.json").get("mlflow_run_id")
               if "evaluate" in results else None]
    tags = provenance_tags() | {"prefect_flow_run_id": str(flow_run.get_id() or "")}
    run_ids = [r for r in run_ids if r]
    with not_fatal(f"provenance tagging of the MLflow runs {run_ids}", log):
        tag_runs(run_ids, tags)
    return results, version


def finetune_overrides(chosen: list[str]) -> dict[str, dict[str, Any]]:
    """``train.retrain: finetune``: the @champion folder the train stage will start from, as a
    params override recorded in the run's outcome (see ``flows.train.with_finetune_start``)."""
    if "train" not in chosen:
        return {}
    from flows.train import with_finetune_start

    params = read_params()
    started = with_finetune_start(params)
    if started.train.init_from == params.train.init_from:
        return {}
    return {"train": {"init_from": started.train.init_from}}


@flow(name="durian-pipeline")
def pipeline_flow(
    stages: list[str] | None = None,
    params_file: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Run ``stages`` (default all, or ``schedule.stages`` when served) in order.

    ``params_file``: another params file than ``params.yaml``; ``source``: a folder, glob or
    CSV/Parquet manifest of videos replacing ``source`` in the params."""
    chosen = list(stages or STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    log = get_run_logger()
    if params_file:
        os.environ["DURIAN_PARAMS"] = str(Path(params_file).resolve())
    schedule = read_params().schedule
    started = time.time()
    outcome: dict[str, Any] = {"flow_run_id": str(flow_run.get_id() or ""), "pid": os.getpid(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with file_lock(lock_path("pipeline"), timeout_s=schedule.lock_timeout_s,
                       what=f"pipeline {outcome['flow_run_id']}"):
            overrides = {"source": source_override(source)} if source else {}
            with run_params(overrides):
                finetune = finetune_overrides(chosen)
                outcome["init_from"] = finetune.get("train", {}).get("init_from")
                with run_params(finetune):
                    results, version = _run_stages(chosen, schedule.version_data)
    except LockBusy as busy:
        outcome |= {"status": "skipped_busy", "reason": str(busy)}
        log.warning("pipeline: another run holds the lock (%s): skipping this run", busy.holder)
        _report(outcome)
        return outcome
    except BaseException as err:
        outcome |= {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}
        _report(outcome)
        raise
    outcome |= {"status": "completed", **run_outcome(results, version),
                "wall_s": round(time.time() - started, 1)}
    _report(outcome)
    return outcome


if __name__ == "__main__":
    from flows.project import run_main

    run_main(pipeline_flow)
