"""File locks that keep two pipeline runs (or two writers of one output folder) apart.

``flock`` locks belong to the open file: the kernel drops them when the holder exits, however
it exits (SIGKILL included), so a crashed run never leaves a stale lock behind. The lock file
holds the holder's pid and what it runs, for ``durian status``-style inspection and tests.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.env import project_dir


class LockBusy(RuntimeError):
    """Another process holds the lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: dict) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


def lock_path(name: str) -> Path:
    # Outside data/ and models/: DVC outputs must not change because a lock was taken.
    return project_dir() / ".durian" / "locks" / f"{name}.lock"


def holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def file_lock(path: Path, timeout_s: float = 0.0, what: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on ``path``; wait up to ``timeout_s`` (0: fail at once) or raise
    :class:`LockBusy`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(path, holder(path)) from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}).encode(),
                  0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
