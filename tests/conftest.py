"""Shared test setup: offline/loopback environment, and a throwaway project folder per test
so no test writes Prefect, MLflow or Ray state into the checkout."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports Prefect: its home (and ephemeral database) outside the checkout.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="durian-tests-prefect-"))
# Ray Train's controller collects a worker's checkpoint report at its poll, every 2 s by
# default, and the worker's next report waits for it (a queue of one): the tests' runs of a
# few fast steps spent most of their training time waiting. Inherited by the subprocesses
# and Ray nodes the tests start; Ray Train passes it on to its controller and workers.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from project_helpers import ROOT


@pytest.fixture(scope="session")
def prefect_engine():
    """One temporary Prefect server for the in-process flows of the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_engine) -> str:
    """That server's API, for flows run as subprocesses (``project_env(..., prefect_api=)``)."""
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


@pytest.fixture
def project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_engine) -> Path:
    """A temporary project folder that in-process flows use as their working directory."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    monkeypatch.chdir(project)
    monkeypatch.setenv("DURIAN_PROJECT_DIR", str(project))
    monkeypatch.delenv("DURIAN_PARAMS", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    return project


@pytest.fixture(scope="session")
def dlib_embedder():
    """dlib's face embedder (its models load once: ~0.7 s)."""
    from preprocessing.identity import DlibEmbedder

    return DlibEmbedder()
