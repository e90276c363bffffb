"""Stopping a stage at a random point: send SIGINT or SIGTERM to a running ``python -m flows.X``
and measure how long it takes to end (the contract of :mod:`flows.stop`)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from pipeline_helpers import python
from project_helpers import project_env

# The bound on the time from the signal to the end of the process (its children too).
STOP_BOUND_S = 10.0


@dataclass
class Stopped:
    returncode: int
    exit_s: float  # from the signal to the end of the whole process group
    delay_s: float  # how long after the trigger the signal was sent
    output: str
    children_left: list[int]

    def assert_stopped(self, sig: int) -> None:
        assert self.returncode in (128 + sig, -sig), (self.returncode, self.output[-3000:])
        assert self.exit_s < STOP_BOUND_S, f"took {self.exit_s:.1f}s to stop"
        assert not self.children_left, f"processes left running: {self.children_left}"
        assert f"stopped by {signal.Signals(sig).name}" in self.output, self.output[-3000:]


def start_stage(args: list[str], project: Path, env: dict[str, str] | None = None
                ) -> tuple[subprocess.Popen, list[str]]:
    """``python <args>`` in ``project``, in a session of its own, output collected by a thread."""
    proc = subprocess.Popen([python(), *args], cwd=project, env=env or project_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _group(pid: int) -> list[int]:
    """Live processes of the session ``pid`` leads (a child that outlived it included)."""
    left = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(p.pid) == pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def interrupt(args: list[str], project: Path, sig: int, trigger: Callable[[str], bool],
              max_delay_s: float, seed: int, env: dict[str, str] | None = None,
              timeout_s: float = 240, group_wait_s: float = 30) -> Stopped:
    """Start a stage, wait until ``trigger(output so far)`` holds, wait a random
    ``[0, max_delay_s)`` (seeded), send ``sig`` to the stage's process and wait for the whole
    process group to end (SIGKILLed after ``group_wait_s``, and then reported as not stopped;
    0 for a SIGKILL, whose orphans nothing would stop)."""
    proc, lines = start_stage(args, project, env)
    delay = random.Random(seed).uniform(0, max_delay_s)
    try:
        deadline = time.monotonic() + timeout_s
        while not trigger("".join(lines)):
            if proc.poll() is not None:
                raise AssertionError(f"{args} ended ({proc.returncode}) before the trigger:\n"
                                     + "".join(lines)[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"{args}: no trigger in {timeout_s}s:\n"
                                     + "".join(lines)[-3000:])
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is not None:
            raise AssertionError(f"{args} ended ({proc.returncode}) before the signal; "
                                 f"lower max_delay_s:\n" + "".join(lines)[-3000:])
        sent = time.monotonic()
        os.kill(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        while _group(proc.pid) and time.monotonic() - sent < group_wait_s:
            time.sleep(0.05)
        exit_s = time.monotonic() - sent
        left = _group(proc.pid)
        time.sleep(0.2)  # the pump thread reads the last lines
        return Stopped(proc.returncode if proc.returncode is not None else -9, exit_s, delay,
                       "".join(lines), left)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(30)
