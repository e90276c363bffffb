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
import os
import shutil
import subprocess
import sys
from pathlib import Path

from flows.common import STAGES


def _venv_env() -> dict[str, str]:
    # DVC runs stage commands through a shell: make `python` mean this interpreter.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _dvc(*args: str) -> int:
    dvc = shutil.which("dvc", path=_venv_env()["PATH"])
    if dvc is None:
        print("error: dvc is not installed in this environment (see README)", file=sys.stderr)
        return 1
    return subprocess.call([dvc, *args], env=_venv_env())


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
        from flows.common import run_main
        from flows.pipeline import pipeline_flow

        run_main(lambda: pipeline_flow(stages=list(args.stages or STAGES)))
        return 0
    if not Path("dvc.yaml").exists():
        print("error: no dvc.yaml here: run `durian run` from the project folder", file=sys.stderr)
        return 1
    targets = list(args.stages or [])
    return _dvc("repro", *targets, *(["--force"] if args.force else []))


def cmd_stage(args: argparse.Namespace) -> int:
    import importlib

    from flows.common import run_main

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
