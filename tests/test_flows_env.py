"""Importing the application writes nothing outside the project folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_importing_flows_leaves_home_untouched(tmp_path: Path) -> None:
    """``flows`` sets up its environment on import (Prefect home, MLflow store, Ray temp dir):
    all of it inside the project, none in the user's home (it once wrote
    ``~/ray_bootstrap_config.yaml``). The CLI and the Ray adapter are imported too, as the
    ``durian`` command and every stage that uses Ray do."""
    home = tmp_path / "home"
    project = tmp_path / "project"
    home.mkdir()
    project.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in {"PREFECT_HOME", "MLFLOW_TRACKING_URI", "DURIAN_PROJECT_DIR"}}
    env["HOME"] = str(home)
    subprocess.run(
        [sys.executable, "-c", "import flows.cli, flows.project, flows.ray_adapter"],
        cwd=project, env=env, check=True, timeout=120,
    )  # fmt: skip
    assert sorted(p.name for p in home.rglob("*")) == []
