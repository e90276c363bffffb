"""Stop requests (Ctrl-C, SIGTERM) for every entry point: end within a bound, say what is done.

A stage's own code stays crash-safe as it is (every output is written to a hidden temporary
and renamed; shards, index parts and checkpoints are whole or absent), so a stop only has to
*end* the process promptly. :func:`stop_guard` does that:

1. The first SIGINT or SIGTERM raises :class:`KeyboardInterrupt` in the main thread, so
   ``finally`` blocks and context managers (file locks, temporary files, ``ray.shutdown``)
   unwind as for Ctrl-C. (Around a flow run Prefect installs its own SIGTERM bridge, which
   raises its ``TerminationSignal`` instead: the same unwinding.) One that Python drops,
   raised while a finalizer or weakref callback ran, is sent again (:func:`_unraisable`).
2. A watcher thread, fed by the interpreter's signal wakeup fd and so independent of whose
   Python handler is installed, then gives the process ``grace_s`` seconds to exit. Work
   that cannot be interrupted from Python (a thread blocked in a read, a native call, an
   HTTP retry loop, Prefect's task pool joined at exit) would otherwise keep it alive; past
   the grace period the watcher stops the process's children (a local Ray, Prefect's
   temporary server), runs the actions registered with :func:`on_forced_exit` (mark the
   MLflow run KILLED, undo a half-made registry version: what the main thread's unwinding
   would have done), says where the main thread was stuck, and exits with the signal's
   status, ``128 + signum``.
3. A second signal exits at once, the same way.

Either way the last line printed says what was finished, as the stage last reported it with
:func:`report_progress`, and that a rerun continues from there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from types import FrameType

import psutil

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The promise is an end within 10 s: the grace, then up to CHILD_GRACE_S for the children
# and, at the same time, the forced-exit actions.
DEFAULT_GRACE_S = 6.0
CHILD_GRACE_S = 2.0


class _State:
    def __init__(self) -> None:
        self.what = "run"
        self.progress = "nothing finished yet"
        self.signum: int | None = None
        self.grace_s = DEFAULT_GRACE_S
        self.told = False
        self.counting = False
        self.exiting = False
        self.redelivered = 0  # wakeup-fd bytes of our own re-deliveries, not new requests
        self.exit_actions: list[Callable[[], None]] = []
        self.lock = threading.Lock()


_state = _State()


def report_progress(text: str) -> None:
    """Record what the running stage has finished so far (printed if it is stopped).

    Cheap and thread-safe: call it whenever a unit of work (a video, a shard, a checkpoint)
    has been made durable.
    """
    with _state.lock:
        _state.progress = text


def stop_requested() -> int | None:
    """The signal number of a stop request received so far, else None."""
    return _state.signum


def is_stop(err: BaseException) -> bool:
    """Whether ``err`` is a stop request unwinding (Ctrl-C, SIGTERM, Prefect's SIGTERM bridge)
    rather than a failure: cleanup that only a stop needs can test it."""
    return stop_requested() is not None or _is_stop_exception(err)


def _is_stop_exception(err: BaseException) -> bool:
    if isinstance(err, KeyboardInterrupt):
        return True
    try:
        from prefect.exceptions import TerminationSignal
    except ImportError:
        return False
    return isinstance(err, TerminationSignal)


def stop_message() -> str:
    signum = _state.signum
    name = signal.Signals(signum).name if signum else "a stop request"
    with _state.lock:
        progress = _state.progress
    return (f"{_state.what}: stopped by {name}; finished: {progress}. "
            f"Rerun to continue from there.")


def _stop_children() -> None:
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=CHILD_GRACE_S)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


@contextlib.contextmanager
def on_forced_exit(action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` if the process is ended by force (the grace ran out, or a second signal)
    while the body runs: the clean-up the body's own unwinding would have done, had the main
    thread got there.

    ``action`` runs on the watcher thread while the main thread may still be running (stuck),
    so it must be safe against that: check the state before undoing it. It gets
    ``CHILD_GRACE_S`` seconds (with the other actions, newest first); past that the process
    exits anyway. Its errors are printed, not raised.
    """
    with _state.lock:
        _state.exit_actions.append(action)
    try:
        yield
    finally:
        with _state.lock:
            _state.exit_actions.remove(action)


def _run_exit_actions() -> None:
    with _state.lock:
        actions = list(reversed(_state.exit_actions))
    for action in actions:
        try:
            action()
        except Exception as err:  # the others still run; the exit is already decided
            print(f"{_state.what}: clean-up at exit failed: {err!r}", file=sys.stderr,
                  flush=True)


def _where_stuck() -> str:
    """Where the main thread is: the project's innermost frame and the two innermost of all,
    the step that did not give way to the stop (to make it interruptible)."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is None:
        return ""
    stack = traceback.extract_stack(frame)
    ours = [i for i, f in enumerate(stack) if f.filename.startswith(_PROJECT_ROOT)]
    shown = sorted({*ours[-1:], len(stack) - 2, len(stack) - 1} - {-1})
    return "".join(traceback.format_list([stack[i] for i in shown]))


def _tell() -> None:
    with _state.lock:
        if _state.told:
            return
        _state.told = True
    print(stop_message(), file=sys.stderr, flush=True)


def _exit_now(signum: int, why: str) -> None:
    """Leave without joining threads (one may be blocked for good); children and the
    forced-exit actions first, side by side, within ``CHILD_GRACE_S``."""
    with _state.lock:
        already = _state.exiting
        _state.exiting = True
    if already:  # the countdown and a second signal at once: the first exit is under way
        time.sleep(CHILD_GRACE_S + 1.0)  # (a backstop, should that one hang)
        os._exit(128 + signum)
    try:
        stuck = _where_stuck()
    except Exception:  # a diagnosis only: the exit must happen
        stuck = ""
    print(f"{_state.what}: {why}; ending it now" + (f", the main thread was at:\n{stuck}"
          if stuck else "\n"), file=sys.stderr, end="", flush=True)
    deadline = time.monotonic() + CHILD_GRACE_S
    actions = threading.Thread(target=_run_exit_actions, daemon=True,
                               name="durian-stop-exit-actions")
    actions.start()
    _stop_children()
    actions.join(max(0.1, deadline - time.monotonic()))
    _tell()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(128 + signum)


def _countdown(signum: int, grace_s: float) -> None:
    time.sleep(grace_s)
    _exit_now(signum, f"the stop did not finish within {grace_s:.0f} s")


def _on_stop_signal(signum: int) -> None:
    """Seen by the watcher thread for every SIGINT/SIGTERM, whoever handles it in Python."""
    with _state.lock:
        first = not _state.counting
        _state.counting = True
        if _state.signum is None:
            _state.signum = signum
    if not first:  # a second request: no more waiting
        _exit_now(_state.signum or signum, "a second stop request")
    # Ray's native failure-signal handler (abseil's) treats SIGTERM as a crash: it arms a 3 s
    # alarm whose handler abort()s, which would end an orderly stop with SIGABRT. Ours bounds
    # the stop instead.
    signal.alarm(0)
    print(f"{_state.what}: {signal.Signals(signum).name} received, stopping "
          f"(at most {_state.grace_s:.0f} s)…", file=sys.stderr, flush=True)
    threading.Thread(target=_countdown, args=(signum, _state.grace_s), daemon=True,
                     name="durian-stop-countdown").start()


def _watch(read_fd: int) -> None:
    # The interpreter's C-level handler writes each caught signal's number to the wakeup fd
    # before any Python handler runs: this sees SIGTERM even while Prefect's own SIGTERM
    # bridge is installed, or while the main thread is stuck in a call that never returns.
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum not in STOP_SIGNALS:
                continue
            with _state.lock:
                ours = _state.redelivered > 0
                if ours:
                    _state.redelivered -= 1
            if not ours:
                _on_stop_signal(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    # The unwinding half: finally blocks and context managers run as for Ctrl-C. (The
    # watcher may not have seen the byte yet: note the request here too.)
    with _state.lock:
        if _state.signum is None:
            _state.signum = signum
    raise KeyboardInterrupt


def _unraisable(unraisable: sys.UnraisableHookArgs, previous: Callable[..., object]) -> None:
    """A stop's exception raised while Python ran a finalizer or a weakref callback (garbage
    collection, at any point of the stage) is printed and dropped: the stage would carry on
    as if no stop came, to its end or to the forced exit. Send the signal to the main thread
    again instead, from another thread a moment later: its handler then runs in the code
    the stop is for (or is held, in a :func:`stop_deferred` body), not in this hook, which
    would drop it again, and a blocking call there gives way to it as to the first. Should it
    land in a finalizer again, it comes back here."""
    signum = _state.signum
    if (signum is None or threading.current_thread() is not threading.main_thread()
            or not _is_stop_exception(unraisable.exc_value)
            or not callable(signal.getsignal(signum))):
        previous(unraisable)
        return
    with _state.lock:
        _state.redelivered += 1  # its byte on the wakeup fd is not a second request
    main = threading.main_thread().ident
    threading.Timer(0.01, signal.pthread_kill, args=(main, signum)).start()


@contextlib.contextmanager
def stop_deferred() -> Iterator[None]:
    """Hold a stop request until the body is done: for a few writes that must go together
    (a shard and the index that lists it), so a stop leaves all of them or none.

    The request is then handled as it would have been (KeyboardInterrupt, or Prefect's
    TerminationSignal), right after the body; the watcher's countdown is already running, so
    a body that never ends cannot hold the process past it. Main thread only (elsewhere the
    body just runs).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    previous = {s: signal.signal(s, hold) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if held:
        handler = previous[held[0]]
        if callable(handler):
            handler(held[0], None)
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), held[0])


@contextlib.contextmanager
def stop_guard(what: str, grace_s: float = DEFAULT_GRACE_S) -> Iterator[None]:
    """Run the body so that SIGINT/SIGTERM end it within ``grace_s`` (+ children's 2 s).

    On a stop request the body sees :class:`KeyboardInterrupt`; once it has unwound, the
    process exits with ``128 + signum`` after printing :func:`stop_message`. Main thread only
    (elsewhere signals cannot be handled and the body just runs).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.what, _state.grace_s, _state.signum = what, grace_s, None
    _state.told = _state.counting = _state.exiting = False
    _state.redelivered = 0
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), daemon=True,
                     name="durian-stop-watch").start()
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unraisable, previous=previous_hook)
    try:
        yield
    except BaseException:
        if _state.signum is None:
            raise
    finally:
        if _state.signum is None:  # after a stop, ours stays: a second signal exits at once
            for s, h in previous.items():
                signal.signal(s, h)
            sys.unraisablehook = previous_hook
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # ends the watcher
    if _state.signum is not None:
        # Unwound after a stop request (KeyboardInterrupt, Prefect's TerminationSignal, or
        # swallowed by the body): exit with the signal's status. Interpreter shutdown still
        # runs atexit hooks (Prefect's temporary server, ray.shutdown, MLflow's end_run); the
        # watchdog, already running, ends it if a thread that never returns blocks that.
        _tell()
        raise SystemExit(128 + _state.signum)
