"""Environment for every entry point (flows, CLI, tests, CI).

Keeps all traffic on this machine and all state inside the project's working directory:
Prefect's home, MLflow's sqlite store and artifacts, Ray's temp dir. A user's own
``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL`` and ``RAY_ADDRESS`` are honoured.
Must run before Prefect, Ray or MLflow is imported (they read settings at import).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # Makes a local Ray bind to 127.0.0.1 rather than the external interface.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "TOKENIZERS_PARALLELISM": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    # mediapipe / LiteRT native logging: warnings and errors only.
    "GLOG_minloglevel": "2",
}


def project_dir() -> Path:
    """The working directory that holds params.yaml, data/ and models/ (the cwd by default)."""
    return Path(os.environ.get("DURIAN_PROJECT_DIR", os.getcwd())).resolve()


def tracking_uri(root: Path | None = None) -> str:
    root = root or project_dir()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> Path:
    return (root or project_dir()) / "mlartifacts"


def ray_temp_dir(root: Path | None = None) -> str:
    # Ray puts unix sockets under its temp dir; their paths must stay short (< 108 bytes).
    candidate = (root or project_dir()) / ".ray"
    if len(str(candidate)) <= 40:
        return str(candidate)
    return str(Path(tempfile.gettempdir()) / f"ray-durian-{os.getuid()}")


def setup(root: Path | None = None) -> Path:
    """Set the offline/loopback variables and local state dirs; return the project dir."""
    root = root or project_dir()
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(root))
    # Ray's dashboard probes cloud metadata addresses unless it finds a local provider config.
    bootstrap = Path.home() / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        try:
            bootstrap.write_text("provider: {type: local}\n")
        except OSError:
            pass
    return root
