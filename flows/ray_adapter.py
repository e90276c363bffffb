"""Ray adapter: connect to the user's cluster (``RAY_ADDRESS`` / params) or start a local one
that stays on 127.0.0.1 with its temp dir inside the project."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from pydantic.warnings import PydanticDeprecatedSince20

from flows.env import local_ray_home, ray_temp_dir

if TYPE_CHECKING:
    from ray.train import Result


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {
        "env_vars": {k: v for k, v in os.environ.items() if k.startswith(_FORWARD)},
        "worker_process_setup_hook": "flows.ray_adapter.quiet_worker_logs",
    }
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    temp_dir = ray_temp_dir()
    with local_ray_home(temp_dir) as user_home:
        # Ray's own processes start with the bootstrap HOME; the workers get the user's back.
        env["env_vars"]["HOME"] = user_home
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            _temp_dir=temp_dir,
            runtime_env=env,
            log_to_driver=True,
        )


def quiet_worker_logs() -> None:
    """Runs in every Ray worker process at start-up."""
    # Without the dashboard (kept off: it probes cloud metadata addresses) Ray Train's
    # placement-group cleaner cannot reach the State API and warns about it every second.
    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


# Settings the workers need to see the same stores and stay offline as the driver.
_FORWARD = (
    "MLFLOW_",
    "DURIAN_",
    "HF_",
    "TRANSFORMERS_",
    "DO_NOT_TRACK",
    "PYTHONPATH",
    "OMP_NUM_THREADS",
)


def is_local_ray() -> bool:
    """Whether the connected Ray is the local one :func:`init_ray` started (its processes are
    this process's children)."""
    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public API
    return node is not None and node.head


def shutdown_now(grace_s: float = 2.0) -> None:
    """Leave Ray at once on a stop request: disconnect (the driver's actors, hence Ray Train's
    controller and workers, die with it) and, for a local cluster, make sure none of its
    processes outlives this call, so nothing writes into the run's storage afterwards."""
    import psutil

    local = ray.is_initialized() and is_local_ray()
    children = psutil.Process().children(recursive=True) if local else []
    ray.shutdown()
    if not children:
        return
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


class UnreadableRunRecord(RuntimeError):
    """Ray Train's record of a run exists but cannot be read (cut short by a crash)."""


def run_record(run_dir: Path) -> Result | None:
    """Ray Train's own record of a run folder, through its public ``Result.from_path``: the
    latest recorded checkpoint with the metrics reported with it, and every checkpoint Ray
    keeps (``best_checkpoints``). None while Ray has recorded nothing there; raises
    :class:`UnreadableRunRecord` when the record is there but broken."""
    from ray.train import Result

    if not run_dir.is_dir():
        return None
    try:
        with warnings.catch_warnings():
            # Ray reads its record with pydantic's V1 ``parse_obj``: not ours to fix.
            warnings.simplefilter("ignore", PydanticDeprecatedSince20)
            return Result.from_path(run_dir)
    except RuntimeError:  # from_path's answer to "no folder" and "no record in it"
        return None
    except Exception as err:
        raise UnreadableRunRecord(f"Ray Train's record in {run_dir} cannot be read: {err}") from err


def latest_reported_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train recorded for a run (None: a fresh run or an
    unreadable record)."""
    try:
        record = run_record(run_dir)
    except UnreadableRunRecord:
        return None
    if record is None or not record.metrics or "step" not in record.metrics:
        return None
    return int(record.metrics["step"])


def recorded_checkpoints(run_dir: Path) -> set[str] | None:
    """The names of the checkpoint folders Ray Train recorded for a run; None when it has
    recorded none. Raises :class:`UnreadableRunRecord`."""
    record = run_record(run_dir)
    if record is None:
        return None
    return {Path(checkpoint.path).name for checkpoint, _ in record.best_checkpoints or []}


def prune_unrecorded_checkpoints(run_dir: Path) -> list[str]:
    """Remove checkpoint folders Ray Train did not record as complete; returns their names.

    Ray copies a checkpoint into storage file by file and records it (its run record) only
    once every rank has reported, and deletes old ones after the record moved on: a stop
    during either leaves a partial folder that no resume would use and no retention would
    remove. Only call it while no worker of the run is alive (before ``fit``, after
    :func:`shutdown_now`)."""
    if not run_dir.is_dir():
        return []
    try:
        recorded = recorded_checkpoints(run_dir)
    except UnreadableRunRecord:
        return []  # never guess which folders are whole
    removed = []
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and folder.name not in (recorded or set()):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed

