"""Issue 23, the late stages: SIGINT and SIGTERM at a random point of ``train`` (driver and Ray
workers), ``evaluate``, ``register`` and ``durian serve`` end the process group within 10 s,
leave only whole outputs (checkpoints Ray recorded, model folder, metrics, plots, registry
versions) and no MLflow run RUNNING, and a rerun finishes from there. The training driver is
also SIGKILLed once (a crash): the rerun resumes at the last checkpoint Ray recorded.

Each stage's inputs are built with library calls; the subprocesses share the test session's
Prefect server (``prefect_engine``) instead of starting one each. The measured times are
printed (``-rP``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
from pipeline_helpers import run, set_params
from project_helpers import make_project, project_env
from stop_helpers import Stopped, interrupt

pytestmark = pytest.mark.e2e

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import write_train_shards  # noqa: E402

from flows.ray_adapter import latest_reported_step, recorded_checkpoints  # noqa: E402

# One Ray worker: two start ~4 s slower, and tests/training/test_training_ray.py trains on
# two (one killed). 10 steps leave the SIGKILL below room before the last checkpoint.
TRAIN = {"steps": 10, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1,
         "preview_every": 0, "num_workers": 1, "cpus_per_worker": 1,
         "max_failures": 1, "batch_size": 1}  # fmt: skip
EVALUATE = {"num_cases": 1, "cross_identity_cases": 1, "steps": 1, "frames": 2,
            "identity": "none", "videos": False}  # fmt: skip


def _env(project: Path) -> dict[str, str]:
    from prefect.settings import get_current_settings  # the prefect_engine fixture's server

    return project_env(project, prefect_api=str(get_current_settings().api.url))


def _project(tmp_path: Path, **sections: dict) -> Path:
    project = make_project(tmp_path / "project")
    set_params(project, {"train": TRAIN, "pair": {"min_gap": 2}, "evaluate": EVALUATE, **sections})
    write_train_shards(project / "data" / "shards")
    return project


def _report(stage: str, sig: int, stopped: Stopped) -> None:
    print(f"STOP {stage} {signal.Signals(sig).name}: exit {stopped.exit_s:.2f} s "
          f"(signal {stopped.delay_s:.2f} s after the trigger), rc {stopped.returncode}; "
          + next((ln.split("finished: ")[-1] for ln in stopped.output.splitlines()
                  if "stopped by" in ln), "?"))


def _mlflow_statuses(project: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    db = project / "mlflow.db"
    if not db.exists():
        return []
    c = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [r.info.status for e in c.search_experiments()
            for r in c.search_runs([e.experiment_id])]  # fmt: skip


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*")) if folder.is_dir() else []


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp*"))


def _left_running(project: Path) -> list[str]:
    """Processes that still name the project (Ray's raylet, GCS and workers carry its temp dir
    in their command line), whether or not they stayed in the stage's session."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(project) in cmd:
            left.append(cmd[:120])
    return left


def _of_project(proc: psutil.Process, project: Path) -> bool:
    """Whether ``proc`` names the project in its command line or its environment."""
    with contextlib.suppress(psutil.Error):
        if str(project) in " ".join(proc.info.get("cmdline") or proc.cmdline() or []):
            return True
        return any(str(project) in value for value in proc.environ().values())
    return False


# ------------------------------------------------------------------------------------- train
def _check_checkpoints(project: Path) -> int | None:
    """Every checkpoint folder is one Ray recorded, whole; returns the latest recorded step."""
    from safetensors.torch import load_file

    latest = None
    for run_dir in (project / "models" / "checkpoints").glob("train-*"):
        recorded = recorded_checkpoints(run_dir) or set()
        assert {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()} == recorded, run_dir
        for name in recorded:
            state = json.loads((run_dir / name / "state.json").read_text())
            assert load_file(str(run_dir / name / "model.safetensors"))
            assert name == f"checkpoint_{state['step']:07d}"
        latest = latest_reported_step(run_dir)
    assert not (project / "models" / "durian").exists()  # a stopped run exports nothing
    assert _hidden(project / "models") == []
    return latest


def test_train_stopped_or_killed_resumes_and_leaves_no_ray_process(tmp_path, prefect_engine):
    project = _project(tmp_path)
    env = _env(project)
    # SIGINT anywhere from the local Ray's start to the first steps.
    first = interrupt(["-m", "flows.train"], project, signal.SIGINT,
                      lambda out: "Started a local Ray instance" in out, 12.0, seed=23, env=env)
    _report("train", signal.SIGINT, first)
    first.assert_stopped(signal.SIGINT)
    assert _left_running(project) == []
    _check_checkpoints(project)
    assert "RUNNING" not in _mlflow_statuses(project)

    # SIGTERM while the workers train and write checkpoints, once Ray recorded the first.
    snapshots = project / "models" / "checkpoints"

    def recorded_step(after: int = 0) -> int:
        """The latest step Ray recorded. Ray's record (read by building Ray's checkpoint
        manager) is read only once a checkpoint folder newer than ``after`` is there, not at
        every 50 ms poll beside the training."""
        numbers = (c.name.removeprefix("checkpoint_")
                   for c in snapshots.glob("train-*/checkpoint_*") if c.is_dir())  # fmt: skip
        newer = any(n.isdigit() and int(n) > after for n in numbers)
        if not newer:
            return after
        return max((latest_reported_step(d) or 0 for d in snapshots.glob("train-*")), default=0)

    second = interrupt(["-m", "flows.train"], project, signal.SIGTERM,
                       lambda _: recorded_step() > 0, 1.5, seed=7, env=env)  # fmt: skip
    _report("train", signal.SIGTERM, second)
    second.assert_stopped(signal.SIGTERM)
    assert _left_running(project) == []
    step = _check_checkpoints(project)
    statuses = _mlflow_statuses(project)
    assert "RUNNING" not in statuses and "KILLED" in statuses
    said = f"checkpoint at step {step} of" if step else "no checkpoint yet"
    assert said in second.output
    assert step

    # A crash: the driver SIGKILLed (no clean-up at all) as soon as the resumed run recorded a
    # newer checkpoint; Ray's orphans go as on a machine that died. The rerun still resumes
    # at the last recorded step (half-copied checkpoint folders are pruned first).
    interrupt(["-m", "flows.train"], project, signal.SIGKILL,
              lambda _: recorded_step(step) > step, 0.0, seed=0, env=env, group_wait_s=0)
    # Every process of the run, orphans included: the train workers' command lines
    # (``ray::…``) do not name the project, and one whose raylet died with the driver's group
    # is no one's child any more, yet it could still record a checkpoint. They all carry the
    # project in their environment (the driver's MLflow and Prefect paths, inherited).
    doomed = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and _of_project(proc, project):
            with contextlib.suppress(psutil.Error):
                doomed += [proc, *proc.children(recursive=True)]
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(doomed, timeout=10)
    at_kill = recorded_step()
    assert step < at_kill < TRAIN["steps"]

    run(["python", "-m", "flows.train"], project, env=env)
    info = json.loads((project / "models" / "train.json").read_text())
    assert info["start_step"] == at_kill and info["steps"] == TRAIN["steps"]
    assert (project / "models" / "durian" / "model_index.json").exists()
    assert _hidden(project / "models") == []
    print(f"STOP train rerun after SIGKILL: resumed at step {info['start_step']}, "
          f"finished at {info['steps']}")


def _stop_twice(stage: str, project: Path, env: dict[str, str], max_delay_s: float,
                seeds: tuple[int, int], check: Callable[[], None]) -> list[Stopped]:
    """SIGINT, then SIGTERM, each at a random point once the flow run began; ``check`` the
    state after each. Returns the two stopped runs."""
    runs = []
    for sig, seed in zip((signal.SIGINT, signal.SIGTERM), seeds, strict=True):
        stopped = interrupt(["-m", f"flows.{stage}"], project, sig,
                            lambda out: "Beginning flow run" in out, max_delay_s, seed=seed,
                            env=env)  # fmt: skip
        _report(stage, sig, stopped)
        stopped.assert_stopped(sig)
        check()
        runs.append(stopped)
    return runs


# ---------------------------------------------------------------------------------- evaluate
def _tiny_model(project: Path) -> None:
    from durian.models.profiles import build_model

    build_model("tiny", resolution=64).save_pretrained(str(project / "models" / "durian"))


def _check_evaluate_outputs(project: Path) -> None:
    from PIL import Image

    metrics, plots = project / "metrics.json", project / "plots"
    if metrics.exists():  # whole, with every output beside it
        assert json.loads(metrics.read_text())["num_cases"] == 1
        assert json.loads((plots / "metrics.json").read_text())["cases"]
        Image.open(plots / "preview.png").load()
    assert _temporaries(project) == [] and _hidden(plots) == []
    assert "RUNNING" not in _mlflow_statuses(project)


def test_evaluate_stops_without_half_outputs(tmp_path, prefect_engine):
    project = _project(tmp_path)
    _tiny_model(project)
    env = _env(project)
    stopped = _stop_twice("evaluate", project, env, 8.0, seeds=(3, 4),
                          check=lambda: _check_evaluate_outputs(project))
    run(["python", "-m", "flows.evaluate"], project, env=env)
    _check_evaluate_outputs(project)
    assert (project / "metrics.json").exists()
    # A signal that lands as the run ends finds its MLflow run logged (and says so): a rerun
    # evaluates again, as a flow run does; every other run ended KILLED, none RUNNING.
    logged = sum(bool(re.search(r"MLflow run [0-9a-f]{32}", s.output)) for s in stopped)
    statuses = _mlflow_statuses(project)
    assert statuses.count("FINISHED") == 1 + logged, (statuses, logged)


# ---------------------------------------------------------------------------------- register
def _registry(project: Path) -> tuple[list, dict[str, str]]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    try:
        versions = c.search_model_versions("name='durian'")
    except MlflowException:
        return [], {}
    aliases = {}
    for alias in ("candidate", "champion"):
        try:
            aliases[alias] = str(c.get_model_version_by_alias("durian", alias).version)
        except MlflowException:
            pass
    return versions, aliases


def _check_registry(project: Path, finished: bool) -> None:
    """Versions are whole: registered, aliased and recorded, their model files there."""
    from mlflow.tracking import MlflowClient

    versions, aliases = _registry(project)
    record = project / "models" / "registered.json"
    if not finished:
        # The first registration was stopped: nothing of it may stay.
        assert versions == [] and aliases == {}
        assert not record.exists()
        return
    assert len(versions) == 1
    (v,) = versions
    assert v.tags["registration"] == "complete" and aliases["candidate"] == str(v.version)
    assert json.loads(record.read_text())["version"] == str(v.version)
    c = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    files = Path(urlparse(c.get_model_version_download_uri("durian", v.version)).path)
    assert list(files.rglob("config.json")), files  # the model's files are there


def test_register_stops_without_half_versions(tmp_path, prefect_engine):
    project = _project(tmp_path)
    _tiny_model(project)
    (project / "metrics.json").write_text(json.dumps({"psnr": 10.0, "xid_psnr": 9.0}))
    env = _env(project)

    def check() -> None:
        _check_registry(project, finished=False)
        assert "RUNNING" not in _mlflow_statuses(project)

    _stop_twice("register", project, env, 6.0, seeds=(5, 6), check=check)
    run(["python", "-m", "flows.register"], project, env=env)
    _check_registry(project, finished=True)


# A step that never gives way to the stop: past the grace the watcher ends the process, and
# first marks the MLflow run KILLED (what the main thread's unwinding would have done).
STUCK = """
import time
from flows.mlflow_adapter import start_run
from flows.stop import stop_deferred, stop_guard

with stop_guard("stuck", grace_s=1.0), start_run("stuck"):
    with stop_deferred():
        print("stuck now", flush=True)
        time.sleep(60)
"""


def test_forced_exit_leaves_no_run_running(tmp_path):
    env = project_env(tmp_path)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    (tmp_path / "stuck.py").write_text(STUCK)  # a file: the traceback then shows its lines
    stopped = interrupt(["stuck.py"], tmp_path, signal.SIGINT,
                        lambda out: "stuck now" in out, 0.0, seed=0, env=env)  # fmt: skip
    _report("stuck step", signal.SIGINT, stopped)
    stopped.assert_stopped(signal.SIGINT)
    assert stopped.exit_s < 1.0 + 3.0  # the grace, then the children's time at most
    assert "the main thread was at" in stopped.output and "time.sleep(60)" in stopped.output
    assert _mlflow_statuses(tmp_path) == ["KILLED"]


# A stop whose KeyboardInterrupt Python drops: raised while a finalizer runs (garbage
# collection can run one anywhere). It must still stop the process promptly, not at the grace.
FINALIZED = """
import os, signal, time
from flows.stop import stop_guard

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs in here; Python drops what it raises
            pass

with stop_guard("gc"):
    Finalized()
    time.sleep(30)
"""


def test_stop_raised_in_a_finalizer_is_not_lost(tmp_path):
    (tmp_path / "finalized.py").write_text(FINALIZED)
    env = project_env(tmp_path)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    start = time.monotonic()
    done = subprocess.run([sys.executable, "finalized.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    took = time.monotonic() - start
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert took < 5.0 and "ending it now" not in done.stderr, (took, done.stderr)


# ------------------------------------------------------------------------------------- serve
def test_serve_stops_idle(tmp_path, prefect_engine):
    project = _project(tmp_path)
    env = _env(project)
    for sig, seed in ((signal.SIGINT, 8), (signal.SIGTERM, 9)):
        # A schedule that never fires in the test: the runner is idle, polling the server.
        stopped = interrupt(["-m", "flows.serve", "serve", "--cron", "0 0 1 1 *"], project,
                            sig, lambda out: "durian-scheduled" in out, 3.0, seed=seed,
                            env=env)  # fmt: skip
        _report("serve (idle)", sig, stopped)
        stopped.assert_stopped(sig)
        assert _left_running(project) == []


def test_check_no_processes_helper_sees_a_running_one(tmp_path):
    # _left_running must be able to fail: a process naming the project is found.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(tmp_path)])
    try:
        assert _left_running(tmp_path)
    finally:
        proc.kill()
        proc.wait()
