"""MLflow adapter: the project's experiment on the local sqlite store (or the user's server)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from flows.env import artifact_root, tracking_uri

EXPERIMENT = "durian"


def client() -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def experiment_id(name: str = EXPERIMENT) -> str:
    """The experiment's id, created with its artifacts inside the project on first use."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        root = artifact_root()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return c.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def start_run(run_name: str, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run in the project's experiment, tagged with the git revision and dataset version.

    It ends FINISHED, FAILED on an error, or KILLED when a stop request (Ctrl-C, SIGTERM)
    unwinds it, so no run stays RUNNING after its process is gone."""
    from flows.stop import is_stop
    from flows.versioning import provenance_tags

    mlflow.set_tracking_uri(tracking_uri())
    tags = {**provenance_tags(), **(tags or {})}
    run = mlflow.start_run(experiment_id=experiment_id(), run_name=run_name, tags=tags)
    try:
        yield run
    except BaseException as err:
        mlflow.end_run("KILLED" if is_stop(err) else "FAILED")
        raise
    mlflow.end_run()
