"""Environment for every entry point (flows, CLI, tests, CI).

Keeps all traffic on this machine and all state inside the project's working directory:
Prefect's home, MLflow's sqlite store and artifacts, Ray's temp dir. A user's own
``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL`` and ``RAY_ADDRESS`` are honoured.
Must run before Prefect, Ray or MLflow is imported (they read settings at import).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    return root


@contextmanager
def local_ray_home(temp_dir: str) -> Iterator[str]:
    """The environment a local Ray starts in, all of its state under ``temp_dir`` (Ray's temp
    dir, see :func:`ray_temp_dir`). Yields the user's own home, for the Ray workers (whose
    model caches live there).

    * ``HOME`` is ``<temp_dir>/home`` while Ray starts its processes (they copy the environment
      then), holding a ``ray_bootstrap_config.yaml`` that names a local provider. Why: Ray's
      usage-stats module (loaded by its dashboard process even with the dashboard off) reads
      ``~/ray_bootstrap_config.yaml`` and, when there is none, sends requests to the cloud
      metadata addresses (169.254.169.254, metadata.google.internal) to name the cloud. Written
      into the user's home, the file is state outside the project and makes Ray Tune take the
      machine for an autoscaling cluster.
    * The cluster's authentication token is ``<temp_dir>/auth_token`` (``RAY_AUTH_TOKEN_PATH``,
      kept for the rest of the process): Ray would otherwise generate ``~/.ray/auth_token``, and
      with ``HOME`` moved its processes and the workers would read different tokens. A token
      the user gives (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) is kept.
    """
    real_home = str(Path.home())
    home = Path(temp_dir) / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        token = Path(temp_dir) / "auth_token"
        if not token.is_file():
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    with environ_set("HOME", str(home)):
        yield real_home


@contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, then as it was (unset if it was unset)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
