"""``durian serve`` and ``durian server``: the pipeline on a schedule, on one machine or
against a remote Prefect server.

``durian server`` starts ``prefect server start --host 127.0.0.1`` with its database in the
project (``PREFECT_HOME=<project>/.prefect``). ``durian serve`` creates the deployment
``durian-pipeline/durian-scheduled`` (parameters: stages, params file, source) and runs its
flow runs in this process's runner, at most one at a time; the flow's own file lock keeps runs
from overlapping whatever serves them. Without ``PREFECT_API_URL``, ``serve`` starts the local
server itself (schedules do not fire in Prefect's ephemeral mode) and stops it on exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEPLOYMENT = "durian-scheduled"
DEFAULT_PORT = 4200
# Within the stop bound of flows.stop (6 s grace) with room for the runner's own shutdown.
SERVER_STOP_S = 3.0


def api_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/api"


def wait_healthy(url: str, timeout_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``<url>/health`` until the server answers; raise if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout_s}s")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_server(port: int = DEFAULT_PORT, log: Path | None = None) -> subprocess.Popen:
    """A ``prefect server`` child on 127.0.0.1:``port`` with the project's PREFECT_HOME."""
    import flows  # noqa: F401  (PREFECT_HOME inside the project, analytics off)

    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another server
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (child owns it)
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def serve(
    cron: str | None = None,
    interval_s: float | None = None,
    stages: list[str] | None = None,
    params_file: str | None = None,
    source: str | None = None,
    name: str = DEPLOYMENT,
) -> None:
    """Serve the pipeline flow as a deployment on ``cron`` or every ``interval_s`` seconds
    (from the params' ``schedule`` section when neither is given). Blocks until interrupted."""
    from flows.pipeline import pipeline_flow
    from flows.project import read_params

    schedule = read_params(params_file).schedule
    cron = cron or (schedule.cron if interval_s is None else None)
    interval_s = interval_s if interval_s is not None else (None if cron else schedule.interval_s)
    if not cron and not interval_s:
        raise ValueError("no schedule: pass --cron or --interval, or set schedule.cron / "
                         "schedule.interval_s in the params")
    parameters = {"stages": list(stages or schedule.stages), "params_file": params_file,
                  "source": source}
    pipeline_flow.serve(
        name=name,
        cron=cron,
        interval=interval_s if not cron else None,
        parameters=parameters,
        description="durian: ingest new videos, preprocess, retrain, evaluate, register",
        tags=["durian"],
        limit=1,  # this runner starts one run at a time; the flow's lock covers other runners
        pause_on_shutdown=True,
    )


def cmd_server(args: argparse.Namespace) -> int:
    from flows.env import project_dir

    if not port_free(args.port):
        print(f"error: port {args.port} on 127.0.0.1 is in use", file=sys.stderr)
        return 1
    proc = start_server(args.port)
    url = api_url(args.port)
    try:
        wait_healthy(url, proc=proc)
        print(f"Prefect server on {url} (database in {project_dir() / '.prefect'}).\n"
              f"In another shell: export PREFECT_API_URL={url}; durian serve --interval 3600")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.stop import report_progress, stop_guard

    params_file = str(Path(args.params).resolve()) if args.params else None
    own = None
    # Ctrl-C or SIGTERM, idle or with a run in flight: the runner and its flow-run processes,
    # then our own server, end within the stop bound (flows.stop), saying so.
    with stop_guard("serve"):
        report_progress("serving; each finished run is in .durian/runs.jsonl")
        try:
            if not os.environ.get("PREFECT_API_URL"):
                # Schedules need a real server: start the project's own for this command.
                port = args.port if port_free(args.port) else _free_port()
                own = start_server(port)
                os.environ["PREFECT_API_URL"] = api_url(port)
                wait_healthy(os.environ["PREFECT_API_URL"], proc=own)
                print(f"started a local Prefect server on {os.environ['PREFECT_API_URL']}",
                      flush=True)
            serve(cron=args.cron, interval_s=args.interval, stages=args.stages or None,
                  params_file=params_file, source=args.source)
        except KeyboardInterrupt:
            pass
        finally:
            if own is not None:
                stop(own, timeout_s=SERVER_STOP_S)
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``server`` to the ``durian`` command."""
    from flows.project import STAGES

    server = subparsers.add_parser(
        "server", help="start a local Prefect server (database in the project's .prefect/)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT)
    server.set_defaults(func=cmd_server)

    serve_p = subparsers.add_parser(
        "serve", help="serve the pipeline as a Prefect deployment on a schedule")
    when = serve_p.add_mutually_exclusive_group()
    when.add_argument("--cron", help='cron schedule, e.g. "0 2 * * *" (default: params)')
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every N seconds")
    serve_p.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                         help="stages each run does (default: schedule.stages)")
    serve_p.add_argument("--params", help="params file (default params.yaml)")
    serve_p.add_argument("--source", help="videos: folder, glob or CSV/Parquet manifest "
                         "(default: source in the params)")
    serve_p.add_argument("--port", type=int, default=DEFAULT_PORT,
                         help="port of the local server started when PREFECT_API_URL is unset")
    serve_p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.serve serve …`` — the same commands without the ``durian`` front."""
    import flows  # noqa: F401

    parser = argparse.ArgumentParser(prog="python -m flows.serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
