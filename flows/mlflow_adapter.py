"""MLflow adapter: the project's experiment on the local sqlite store (or the user's server)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psutil
from mlflow.tracking import MlflowClient

from flows.env import artifact_root, tracking_uri
from flows.stop import on_forced_exit, stop_deferred

EXPERIMENT = "durian"


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    _store_ready(uri)
    return MlflowClient()


@functools.cache
def _store_ready(uri: str) -> None:
    """Open the tracking store once per process, never leaving it half made.

    A new store creates and migrates its tables on first use, and a stop in the middle of
    that leaves a database no later run can open ("duplicate column name"). A new sqlite file
    is therefore built aside and put in place whole (:func:`_create_sqlite_store`), which a
    stop may interrupt at any point: on 2 loaded cores the migrations take longer than the
    stop's grace, so holding the stop for them would end in a forced exit in their middle.
    Any other store is opened with stop requests held."""
    db = _sqlite_file(uri)
    if db is not None and not db.exists():
        _create_sqlite_store(db)
    with stop_deferred():
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a plain ``sqlite:///<path>`` URI, else None."""
    path = uri.removeprefix("sqlite:///")
    if path == uri or "?" in uri or path in ("", ":memory:"):
        return None
    return Path(path)


def _create_sqlite_store(db: Path) -> None:
    """Create the MLflow tables in a file beside ``db``, then link it to ``db``: the store
    appears whole or not at all. A process that made ``db`` first wins (a link never
    replaces), and the loser's copy, never used, is dropped."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    # Left by a process killed while creating (with sqlite's journal beside it).
    for stale in db.parent.glob(f".{db.name}.*.init*"):
        pid = stale.name.split(".")[-2]
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):
            stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{os.getpid()}.init")
    files = [tmp, *(tmp.with_name(tmp.name + end) for end in ("-journal", "-wal", "-shm"))]
    for f in files:
        f.unlink(missing_ok=True)
    try:
        # The artifact root MLflow's own client would give the store (its Default
        # experiment's location); the project's experiment has its own (experiment_id).
        store = SqlAlchemyStore(f"sqlite:///{tmp}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
        store.engine.dispose()  # all written and closed before the file is shown
        with contextlib.suppress(FileExistsError):
            os.link(tmp, db)
    finally:
        for f in files:
            f.unlink(missing_ok=True)


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
    unwinds it, or when the stop has to end the process before the unwinding got here
    (:func:`flows.stop.on_forced_exit`), so no run stays RUNNING after its process is gone."""
    from flows.stop import is_stop
    from flows.versioning import provenance_tags

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    tags = {**provenance_tags(), **(tags or {})}
    # Before the stop is held: on first use this creates the store, which can take seconds.
    experiment = experiment_id()
    created: list[str] = []
    with on_forced_exit(lambda: _kill_if_running(uri, created)):
        try:
            # Stop requests held while the run is created and while it is ended: a stop
            # between MLflow writing the run and handing it back would leave it RUNNING.
            with stop_deferred():
                run = mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=tags)
                created.append(run.info.run_id)
            yield run
        except BaseException as err:
            if mlflow.active_run() is not None:
                with stop_deferred():
                    mlflow.end_run("KILLED" if is_stop(err) else "FAILED")
            raise
        with stop_deferred():
            mlflow.end_run()


def _kill_if_running(uri: str, run_ids: list[str]) -> None:
    """Mark the runs KILLED that are still RUNNING: the process is ended by force while the
    main thread, stuck in some step, has not ended them (it may still be ending them, so a
    run it finished is left alone)."""
    c = MlflowClient(tracking_uri=uri)
    for run_id in run_ids:
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, "KILLED")


def tag_runs(run_ids: list[str], tags: dict[str, str]) -> None:
    """Set ``tags`` on the runs ``run_ids`` (provenance known only after they ended)."""
    c = client()
    for run_id in run_ids:
        for key, value in tags.items():
            c.set_tag(run_id, key, value)
