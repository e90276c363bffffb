"""``durian``: the command that fronts the common actions.

    durian run                 run the whole pipeline under DVC (only what changed reruns)
    durian run --no-dvc        the same stages as one Prefect flow, without DVC bookkeeping
    durian stage NAME          one stage's Prefect flow (sample, ingest, preprocess, …)
    durian status              data, shards, model and registry at a glance
    durian fetch-models        put the mediapipe model files where the code finds them
    durian animate …           portrait + attribute image(s) + driving motion → MP4
    durian app                 the same in a web page on 127.0.0.1
    durian server              a local Prefect server (database in .prefect/)
    durian serve [--cron C | --interval S]   the pipeline as a scheduled Prefect deployment
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from flows.project import STAGES


def _venv_env() -> dict[str, str]:
    # DVC runs stage commands through a shell: make `python` mean this interpreter.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# A stage stops within flows.stop's bound (6 s, then 2 s for its children); DVC exits
# right after it. What is still running past this is killed, to end within 10 s.
FORWARD_STOP_S = 9.0
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "fish"})


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal is still a member
        return True
    return True


def _stage_commands(pid: int) -> list[psutil.Process]:
    """The commands process ``pid`` (DVC) runs: its children, looking through shells."""
    found, todo = [], psutil.Process(pid).children()
    while todo:
        child = todo.pop()
        with contextlib.suppress(psutil.Error):
            if child.name() in SHELLS:
                todo.extend(child.children())
            else:
                found.append(child)
    return found


def _forward(pid: int, signum: int) -> None:
    """The stage command gets the signal itself and stops as :mod:`flows.stop` says (its own
    children, a temporary Prefect server or a local Ray, go with it: signalling those too
    would cut the stage off from them mid-stop). DVC gets SIGINT, its graceful stop: it
    ignores it while a stage runs, then records nothing for the stage that failed."""
    with contextlib.suppress(psutil.Error):
        for child in _stage_commands(pid):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)


def call_forwarding_stops(cmd: list[str], env: dict[str, str]) -> int:
    """Run ``cmd`` (DVC) in a process group of its own and return its exit status.

    A SIGINT or SIGTERM to this process is passed on (:func:`_forward`), and the call
    returns ``128 + signum`` once the whole group is gone; what is left of it after
    ``FORWARD_STOP_S`` is killed. (``subprocess.call`` would leave a SIGTERMed ``durian``'s
    children running, and on Ctrl-C kill DVC at once, orphaning its stage.)
    """
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    stops: list[tuple[int, float]] = []

    def forward(signum: int, frame: object) -> None:
        stops.append((signum, time.monotonic()))
        _forward(proc.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        if not stops:
            return code
        deadline = stops[0][1] + FORWARD_STOP_S
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        print(f"durian: stopped by {signal.Signals(stops[0][0]).name}; the stage said what "
              "it finished above. Rerun to continue from there.", file=sys.stderr)
        return 128 + stops[0][0]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _dvc(*args: str) -> int:
    dvc = shutil.which("dvc", path=_venv_env()["PATH"])
    if dvc is None:
        print("error: dvc is not installed in this environment (see README)", file=sys.stderr)
        return 1
    return call_forwarding_stops([dvc, *args], env=_venv_env())


def cmd_run(args: argparse.Namespace) -> int:
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})", file=sys.stderr)
        return 2
    if args.params and not args.no_dvc:
        print("error: --params needs --no-dvc (DVC stages read params.yaml)", file=sys.stderr)
        return 2
    if args.params:
        os.environ["DURIAN_PARAMS"] = str(Path(args.params).resolve())
    if args.no_dvc:
        from flows.pipeline import pipeline_flow
        from flows.project import run_main

        run_main(lambda: pipeline_flow(stages=list(args.stages or STAGES)))
        return 0
    if not Path("dvc.yaml").exists():
        print("error: no dvc.yaml here: run `durian run` from the project folder", file=sys.stderr)
        return 1
    targets = list(args.stages or [])
    return _dvc("repro", *targets, *(["--force"] if args.force else []))


def cmd_stage(args: argparse.Namespace) -> int:
    import importlib

    from flows.project import run_main

    module = importlib.import_module(f"flows.{args.name}")
    run_main(getattr(module, f"{args.name}_flow"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows.status import status_lines

    for line in status_lines():
        print(line)
    return 0


def cmd_fetch_models(args: argparse.Namespace) -> int:
    from preprocessing.mp_models import main as mp_main

    return mp_main(["fetch"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="durian",
        description="Durian: portrait animation with attribute transfer — data pipeline, "
        "training, evaluation and registry. Run commands from the project folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `durian run` on the embedded sample data, then `durian status`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (dvc repro of all stages)")
    run.add_argument("stages", nargs="*", metavar="STAGE",
                     help=f"run up to these stages (default all: {', '.join(STAGES)})")
    run.add_argument("--no-dvc", action="store_true", help="run as one Prefect flow, no DVC")
    run.add_argument("--force", action="store_true", help="rerun stages even if unchanged")
    run.add_argument("--params", help="params file (default params.yaml)")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage's Prefect flow")
    stage.add_argument("name", choices=STAGES)
    stage.set_defaults(func=cmd_stage)

    status = sub.add_parser("status", help="show data, shards, model and registry")
    status.set_defaults(func=cmd_status)

    fetch = sub.add_parser("fetch-models", help="fetch the mediapipe model files (offline after)")
    fetch.set_defaults(func=cmd_fetch_models)

    from flows import animate as animate_cli
    from flows import app as app_cli
    from flows.serve import add_parser as add_schedule_parsers

    animate_cli.add_parser(sub)
    app_cli.add_parser(sub)
    add_schedule_parsers(sub)  # `durian serve`, `durian server`
    return parser


def main(argv: list[str] | None = None) -> int:
    import flows  # noqa: F401  (sets the offline/loopback environment first)

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
