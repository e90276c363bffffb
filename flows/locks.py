"""File locks that keep two pipeline runs (or two writers of one output folder) apart.

``filelock.FileLock`` takes a kernel ``flock`` on the open file: the kernel drops it when the
holder exits, however it exits (SIGKILL included), so a crashed run never leaves a stale lock
behind. The lock file holds the holder's pid and what it runs, for ``durian status``-style
inspection and tests; filelock opens it without truncating, so a contender that loses the race
leaves the holder's record readable.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

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

    def record_holder(fd: int) -> None:  # runs with the lock held, before acquire returns
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()})
                  .encode(), 0)

    path.parent.mkdir(parents=True, exist_ok=True)
    # preserve_lock_file: the record must stay at this path; fallback_to_soft=False: a
    # filesystem without flock fails loudly rather than getting a lock a SIGKILL leaves stale.
    lock = FileLock(path, poll_interval=0.5, preserve_lock_file=True, fallback_to_soft=False,
                    on_acquired=record_holder)
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise LockBusy(path, holder(path)) from None
    try:
        yield path
    finally:
        # Emptied while still held: a reader never sees a finished run's record as a holder.
        os.truncate(path, 0)
        lock.release()
