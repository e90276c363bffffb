"""``durian animate``: animate a portrait wearing attributes from other images.

    durian animate --portrait P --attribute IMG[:category] [--attribute …]
                   [--alpha A | --alpha-ramp] --driving VIDEO|preset --out OUT.mp4
                   [--model models:/durian@champion | PATH] [--frames N] [--steps S]
                   [--guidance G] [--seed K] [--device auto|cpu|cuda] [--side-by-side]

The model is a local folder (a ``DurianModel.save_pretrained`` folder, a saved pipeline, or a
downloaded MLflow pyfunc) or a registry URI ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
on the project's MLflow store. Every bad input ends with exit code 1 and one line
``error: …`` on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "models:/durian@champion"


class ModelNotFoundError(LookupError):
    """The ``--model`` cannot be found in the registry or on disk (one-line message)."""


def _not_found(spec: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model cannot be found in the registry or on disk: {spec} ({why})")


def model_folder(path: Path) -> Path | None:
    """The DurianModel folder (with config.json) inside ``path``: the folder itself, a saved
    pipeline's ``model/``, or an MLflow pyfunc's ``model`` artifact; None if none."""
    if (path / "config.json").is_file():
        return path
    if (path / "model_index.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "MLmodel").is_file():
        from mlflow.models import Model

        flavor = Model.load(str(path / "MLmodel")).flavors.get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get("model") or {}
        if artifact.get("path"):
            return model_folder(path / artifact["path"])
    return None


@contextlib.contextmanager
def resolved_model(spec: str) -> Iterator[Path]:
    """Yield a local DurianModel folder for ``spec`` (a path or ``models:/…``); a registry
    model is downloaded into a temporary folder that is removed afterwards."""
    if not spec.startswith("models:/"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise _not_found(spec, "no such folder")
        folder = model_folder(path) if path.is_dir() else None
        if folder is None:
            raise _not_found(spec, "not a Durian model folder: no config.json")
        yield folder
        return

    import mlflow
    from mlflow.exceptions import MlflowException

    from flows.env import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # Opening a missing sqlite store would create an empty one in the user's folder.
        raise _not_found(spec, f"no MLflow store at {uri[len('sqlite:///') :]}")
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory(prefix="durian-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=tmp))
        except MlflowException as err:
            first = str(err.message).strip().splitlines()[0] if str(err.message) else "not found"
            raise _not_found(spec, first) from None
        folder = model_folder(local)
        if folder is None:
            raise _not_found(spec, "the registered model has no 'model' artifact")
        yield folder


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from durian.inference.errors import DurianInputError

        raise DurianInputError("--device cuda asked for, but CUDA is not available here")
    return name


def load_pipeline(spec: str, device: str = "auto") -> Any:
    """A ready :class:`DurianPipeline` for ``--model`` ``spec`` on ``device`` (fp16 on CUDA)."""
    import torch

    from durian.models.durian_model import DurianModel
    from durian.models.profiles import make_noise_scheduler
    from durian.pipelines.pipeline_durian import DurianPipeline

    device = pick_device(device)
    with resolved_model(spec) as folder:
        try:
            model = DurianModel.from_pretrained(folder).eval()
        except (OSError, ValueError, KeyError, TypeError) as err:
            msg = " ".join(str(err).split())[:200]
            raise _not_found(spec, f"cannot load it: {type(err).__name__}: {msg}") from None
    pipe = DurianPipeline(model=model, scheduler=make_noise_scheduler("ddim"))
    # fp16 on CUDA; on CPU the saved fp32 weights stay as they are.
    return pipe.to(device, torch.float16) if device == "cuda" else pipe.to(device)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--portrait", required=True, metavar="P", help="portrait image")
    parser.add_argument(
        "--attribute",
        required=True,
        action="append",
        metavar="IMG[:category]",
        help="attribute image, optionally with its category (hair, glasses, hat, earrings, "
        "beard; default: what the face parser finds). Repeat to compose several",
    )
    mix = parser.add_mutually_exclusive_group()
    mix.add_argument(
        "--alpha", type=float, metavar="A", help="interpolate between 2 attributes (0..1)"
    )
    mix.add_argument(
        "--alpha-ramp", action="store_true", help="morph from attribute 1 to 2 over the video"
    )
    parser.add_argument(
        "--driving", required=True, metavar="VIDEO|preset",
        help="driving video, or a motion preset: still, nod, turn, tilt, talk",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="OUT.mp4", help="output H.264 MP4")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="URI|PATH",
        help=f"registry URI or local model folder (default {DEFAULT_MODEL})",
    )  # fmt: skip
    parser.add_argument("--frames", type=_positive_int, metavar="N", help="output frames")
    parser.add_argument("--steps", type=_positive_int, default=25, metavar="S")
    parser.add_argument("--guidance", type=float, default=3.5, metavar="G")
    parser.add_argument("--seed", type=int, default=0, metavar="K")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--side-by-side", action="store_true", help="portrait | attributes | driving | result"
    )
    parser.set_defaults(func=cmd_animate)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``animate`` on ``durian``'s subcommands."""
    parser = subparsers.add_parser(
        "animate",
        help="animate a portrait with attributes from other images",
        description="Animate a portrait wearing attributes (hair, glasses, …) taken from other "
        "images, driven by a video or a motion preset.",
    )
    return add_arguments(parser)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send what native libraries (mediapipe, LiteRT) write to fd 2 to /dev/null while Python's
    own stderr (progress bars, the error line) still reaches the terminal. Only for a real
    process stderr: under a test's captured stderr nothing changes."""
    if sys.stderr is not sys.__stderr__ or sys.stderr is None:
        yield
        return
    try:
        fd = sys.stderr.fileno()
    except (OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    python_stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    sys.stderr = python_stderr
    try:
        yield
    finally:
        python_stderr.flush()
        sys.stderr = sys.__stderr__
        os.dup2(saved, fd)
        os.close(saved)
        python_stderr.close()


def run(args: argparse.Namespace) -> Path:
    """Do the work of ``durian animate``; raises DurianInputError / ModelNotFoundError."""
    from durian.inference import animate, parse_attribute_spec
    from durian.inference.animate import check_driving
    from durian.inference.errors import DurianInputError
    from durian.inference.prepare import check_alpha
    from preprocessing.video import write_video

    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise DurianInputError(f"--out must name an .mp4 file, got '{out.name}'")
    # Cheap checks first: a typo should not wait for the model to load.
    attributes = [parse_attribute_spec(a) for a in args.attribute]
    check_alpha(args.alpha, args.alpha_ramp, len(attributes))
    check_driving(args.driving)
    pipe = load_pipeline(args.model, args.device)
    result = animate(
        pipe,
        args.portrait,
        attributes,
        args.driving,
        alpha=args.alpha,
        alpha_ramp=args.alpha_ramp,
        frames=args.frames,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        side_by_side=args.side_by_side,
    )
    write_video(out, result.frames, result.fps)
    return out


def cmd_animate(args: argparse.Namespace) -> int:
    from durian.inference.errors import DurianInputError

    with quiet_native_stderr():
        try:
            out = run(args)
        except (DurianInputError, ModelNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.animate …`` (the same as ``durian animate …``)."""
    import flows  # noqa: F401  (offline/loopback environment before MLflow is imported)

    parser = add_arguments(argparse.ArgumentParser(prog="durian animate"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
