"""A real multi-node Ray cluster on this one machine (127.0.0.1), to run and test the
multi-node paths without a second machine: a head and a second node, each a ``ray start`` of
its own (its own raylet, object store and temp dir), ``cpus`` CPUs each. Used by the tests and
``benchmarks/scale.py --cluster``; point ``train.ray_address`` (or ``RAY_ADDRESS``) at the
address it yields."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict[str, str]) -> None:
    ray_cli = str(Path(sys.executable).parent / "ray")
    proc = subprocess.run([ray_cli, *args], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def cluster_processes(folder: Path) -> list[psutil.Process]:
    """The Ray processes whose command line names one of the cluster's temp dirs, and their
    children (the worker processes, renamed ``ray::…``)."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and str(folder) in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


@contextlib.contextmanager
def two_node_cluster(folder: Path, env: dict[str, str], cpus: int = 1) -> Iterator[str]:
    """Start the cluster (state under ``folder``, kept short: Ray's socket paths must be under
    108 bytes) in ``env``; yield its address; stop exactly its processes (not other Rays of
    this user)."""
    folder.mkdir(parents=True, exist_ok=True)
    home = folder / "home"
    home.mkdir(exist_ok=True)
    # As flows.env.local_ray_home: Ray's usage stats must not probe cloud metadata addresses.
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    # flows.env sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to keep a one-node Ray on the loopback;
    # a second node needs Ray's multi-node mode (still every address on 127.0.0.1 here).
    env = env | {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats"]
    try:
        _ray(["start", "--head", f"--port={port}", f"--temp-dir={folder / 'h'}",
              "--include-dashboard=false", *common], env)
        _ray(["start", f"--address={address}", f"--temp-dir={folder / 'w'}", *common], env)
        yield address
    finally:
        procs = cluster_processes(folder)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        time.sleep(0.2)
