"""Ray adapter: connect to the user's cluster (``RAY_ADDRESS`` / params) or start a local one
that stays on 127.0.0.1 with its temp dir inside the project."""

from __future__ import annotations

import logging
import os

import ray

from flows.env import ray_temp_dir


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
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=ray_temp_dir(),
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
