"""Stage ``register``: log the trained model as an MLflow pyfunc, register it as a new version of
``durian`` with alias ``candidate``, and move ``champion`` to it only if the promotion rule
says so (strictly better on every primary metric). The rule, the compared numbers and the
decision are tags on the version; ``models/registered.json`` records the outcome.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger

from durian.evaluation.promotion import decide
from flows.component_store import without_frozen
from flows.mlflow_adapter import client, start_run
from flows.model_store import ModelNotFoundError, resolve_model
from flows.project import paths, read_params, run_main, write_json
from flows.stop import on_forced_exit, report_progress

PYFUNC = Path(__file__).with_name("pyfunc_model.py")
# The packages the registered model runs: the library and what it imports (the face embedders).
CODE_PACKAGES = [str(Path(__file__).resolve().parents[1] / name)
                 for name in ("durian", "preprocessing")]  # fmt: skip
METRIC_TAG = "metric."
# A version is registered whole: ``registration`` says whether its aliases, tags and
# registered.json were all set; ``rollback.<alias>`` what the alias pointed at before.
STATUS_TAG = "registration"
PREVIOUS_TAG = "rollback."
ALIASES = ("candidate", "champion")


def input_example(resolution: int) -> pd.DataFrame:
    """A tiny request (flat grey images) that documents the input schema."""
    import numpy as np

    from flows.pyfunc_model import encode_png

    img = np.full((resolution, resolution, 3), 128, np.uint8)
    mask = np.zeros((resolution, resolution), np.uint8)
    mask[: resolution // 4] = 255
    return pd.DataFrame([{
        "portrait": encode_png(img), "portrait_mask": encode_png(mask),
        "attribute": encode_png(img), "attribute_mask": encode_png(mask),
        "keypoints": json.dumps([encode_png(img)]), "steps": 1, "guidance": 1.0, "seed": 0,
    }])


def requirements(model: Path) -> list[str]:
    """The pinned packages the registered model runs with (``model``: its folder): the face
    embedder's too when the model reads one."""
    from importlib.metadata import version

    from durian.models.config import identity_embedder_of

    names = ["torch", "diffusers", "transformers", "safetensors", "numpy", "pillow", "mlflow",
             "opencv-contrib-python", "scikit-image"]
    config = model / "model" / "config.json"
    config = config if config.is_file() else model / "config.json"
    embedder = identity_embedder_of(json.loads(config.read_text()))
    if embedder == "arcface":
        # Its ONNX file is the user's own download: it would have to travel with the version.
        raise ValueError(f"{model} reads ArcFace embeddings: registering such a model is not "
                         "supported yet (use it from its folder with --arcface-model)")
    if embedder == "dlib":
        names += ["dlib", "face-recognition-models"]
    return [f"{n}=={version(n)}" for n in names]


def _alias_version(name: str, alias: str) -> str | None:
    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@contextlib.contextmanager
def registering(name: str, model_uri: str, previous: dict[str, str | None]) -> Iterator[str]:
    """A new version of ``name`` that is whole or gone: created tagged incomplete (with the
    versions its aliases pointed at before), completed only once the body (aliases, tags,
    ``registered.json``) is through. If the body fails or is stopped, the version is rolled
    back at once; if the process is killed, the next run rolls it back
    (:func:`rollback_incomplete`)."""
    c = client()
    tags = {STATUS_TAG: "incomplete"}
    tags |= {f"{PREVIOUS_TAG}{alias}": v or "" for alias, v in previous.items()}
    # Created with its tags in one call: never a version without the incomplete mark.
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    try:
        yield version
        c.set_model_version_tag(name, version, STATUS_TAG, "complete")
    except BaseException:
        rollback(name, version, previous)
        raise


def restore_file(path: Path, content: bytes | None) -> None:
    if content is None:
        path.unlink(missing_ok=True)
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        tmp.replace(path)


def names_whole_version(record: Path, name: str) -> bool:
    """Whether ``record`` (registered.json) is absent or names a completed version of
    ``name``."""
    if not record.exists():
        return True
    try:
        version = client().get_model_version(name, json.loads(record.read_text())["version"])
    except (MlflowException, KeyError, ValueError):
        return False
    return version.tags.get(STATUS_TAG) == "complete"


def rollback(name: str, version: str, previous: dict[str, str | None]) -> None:
    """Put the aliases back where they were and delete ``version``."""
    c = client()
    for alias in ALIASES:
        if _alias_version(name, alias) != version:
            continue
        if previous.get(alias):
            c.set_registered_model_alias(name, alias, previous[alias])
        else:
            c.delete_registered_model_alias(name, alias)
    c.delete_model_version(name, version)


def rollback_incomplete(name: str) -> list[str]:
    """Roll back every version of ``name`` a killed run left incomplete; returns them."""
    try:
        versions = client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    undone = []
    for v in sorted(versions, key=lambda v: -int(v.version)):  # newest first: aliases unwind
        if v.tags.get(STATUS_TAG) != "incomplete":
            continue
        previous = {a: v.tags.get(f"{PREVIOUS_TAG}{a}") or None for a in ALIASES}
        rollback(name, str(v.version), previous)
        undone.append(str(v.version))
    return undone


def champion_metrics(name: str) -> tuple[str | None, dict[str, float] | None]:
    try:
        version = client().get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    metrics = {k[len(METRIC_TAG):]: float(v) for k, v in version.tags.items()
               if k.startswith(METRIC_TAG)}
    return str(version.version), metrics


@flow(name="register")
def register_flow() -> dict[str, Any]:
    log = get_run_logger()
    params = read_params()
    r = params.register
    p = paths()
    try:
        model = resolve_model(p.model)  # a pipeline folder, or a bare model folder of old
    except ModelNotFoundError:
        raise FileNotFoundError(f"{p.model} holds no model: run the train stage first") from None
    if not p.metrics.exists():
        raise FileNotFoundError(f"{p.metrics} not found: run the evaluate stage first")
    metrics = json.loads(p.metrics.read_text())
    train_run = json.loads(p.train_info.read_text()).get("mlflow_run_id") \
        if p.train_info.exists() else None
    eval_run = json.loads((p.root / "models" / "evaluate.json").read_text()).get("mlflow_run_id") \
        if (p.root / "models" / "evaluate.json").exists() else None

    c = client()
    undone = rollback_incomplete(r.model_name)  # what a stopped or killed run left half-made
    if undone:
        log.warning("register: removed incomplete version(s) %s of %s", undone, r.model_name)
    with start_run("register", tags={"stage": "register", "training_run_id": train_run or "",
                                     "evaluation_run_id": eval_run or ""}) as run:
        # The model's files first, then the version pointing at them: a stop during the upload
        # leaves no version at all. Frozen components are stored once, not in every version.
        staging_root = p.root / ".durian"
        staging_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="register-", dir=staging_root) as staging:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC),
                artifacts={"model": str(without_frozen(model, Path(staging) / "model"))},
                code_paths=CODE_PACKAGES,
                input_example=input_example(params.model.resolution),
                pip_requirements=requirements(model),
            )
        report_progress(f"model logged to MLflow run {run.info.run_id}; no version yet")
        previous = {alias: _alias_version(r.model_name, alias) for alias in ALIASES}
        before = p.registered.read_bytes() if p.registered.exists() else None

        def undo() -> None:
            """The stop ends the process by force mid-registration: what the except below
            would have done (the main thread, stuck, may still be at it)."""
            rollback_incomplete(r.model_name)
            if not names_whole_version(p.registered, r.model_name):
                restore_file(p.registered, before)

        try:
            with on_forced_exit(undo), \
                    registering(r.model_name, info.model_uri, previous) as version:
                c.set_registered_model_alias(r.model_name, "candidate", version)
                for k, v in metrics.items():
                    c.set_model_version_tag(r.model_name, version, f"{METRIC_TAG}{k}", str(v))
                champ_version, champ = champion_metrics(r.model_name)
                decision = decide(metrics, champ, r.primary_metrics, r.higher_is_better)
                rule = (f"{'higher' if r.higher_is_better else 'lower'} is better, strictly on all "
                        f"of {r.primary_metrics}; ties and missing metrics do not promote")
                tags = {
                    "promotion.rule": rule,
                    "promotion.compared": json.dumps(
                        {k: list(v) for k, v in decision.compared.items()}),
                    "promotion.against": champ_version or "none",
                    "promotion.decision": "promoted" if decision.promote else "kept",
                    "promotion.reason": decision.reason,
                    "training_run_id": train_run or "",
                    "evaluation_run_id": eval_run or "",
                }
                for k, v in tags.items():
                    c.set_model_version_tag(r.model_name, version, k, v)
                if decision.promote:
                    c.set_registered_model_alias(r.model_name, "champion", version)
                aliases = sorted(c.get_model_version(r.model_name, version).aliases)
                outcome = {"name": r.model_name, "version": version, "aliases": aliases,
                           "promoted": decision.promote, "reason": decision.reason,
                           "model_uri": f"models:/{r.model_name}/{version}"}
                write_json(p.registered, outcome)
        except BaseException:
            restore_file(p.registered, before)  # the version it named is gone again
            raise
    report_progress(f"{r.model_name} v{version} registered, aliases {aliases}")
    log.info("register: %s v%s aliases %s — %s", r.model_name, version, aliases, decision.reason)
    return outcome


if __name__ == "__main__":
    run_main(register_flow)
