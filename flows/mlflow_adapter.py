"""MLflow adapter: the project's experiment on the local sqlite store (or the user's server)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from flows.env import artifact_root, tracking_uri
from flows.stop import stop_deferred

EXPERIMENT = "durian"


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    _store_ready(uri)
    return MlflowClient()


@functools.cache
def _store_ready(uri: str) -> None:
    """Open the tracking store once per process with stop requests held: a new sqlite store
    creates and migrates its tables on first use, and a stop in the middle of that leaves a
    database no later run can open ("duplicate column name")."""
    with stop_deferred():
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


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
    try:
        # Stop requests held while the run is created and while it is ended: a stop between
        # MLflow writing the run and handing it back would leave it RUNNING for good.
        with stop_deferred():
            run = mlflow.start_run(experiment_id=experiment_id(), run_name=run_name, tags=tags)
        yield run
    except BaseException as err:
        if mlflow.active_run() is not None:
            with stop_deferred():
                mlflow.end_run("KILLED" if is_stop(err) else "FAILED")
        raise
    with stop_deferred():
        mlflow.end_run()


def tag_runs(run_ids: list[str], tags: dict[str, str]) -> None:
    """Set ``tags`` on the runs ``run_ids`` (provenance known only after they ended)."""
    c = client()
    for run_id in run_ids:
        for key, value in tags.items():
            c.set_tag(run_id, key, value)
