"""``durian animate``: animate a portrait wearing attributes from other images.

    durian animate --portrait P --attribute IMG[:category] [--attribute …]
                   [--alpha A | --alpha-ramp] --driving VIDEO|preset --out OUT.mp4
                   [--model models:/durian@champion | PATH] [--frames N] [--steps S]
                   [--guidance G] [--seed K] [--device auto|cpu|cuda] [--cpu-offload]
                   [--side-by-side]
                   [--parser landmarks|bisenet|segformer] [--parser-weights FILE|DIR]

The model is a local folder (a saved pipeline, an older ``DurianModel.save_pretrained`` folder,
or a downloaded MLflow pyfunc) or a registry URI ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
on the project's MLflow store, found by :func:`flows.model_store.resolve_model`. Faces are parsed
with the project's ``preprocess.parser`` / ``parser_weights`` (params.yaml) unless ``--parser`` /
``--parser-weights`` say otherwise (:func:`parser_setting`). Every bad input ends with exit code
1 and one line ``error: …`` on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "models:/durian@champion"


def load_pipeline(spec: str, device: str = "auto", cpu_offload: bool = False) -> Any:
    """A ready :class:`DurianPipeline` for ``--model`` ``spec`` (a folder or a ``models:/`` URI)
    on ``device`` (:func:`~durian.pipelines.pipeline_durian.load_durian_pipeline`)."""
    from durian.pipelines.pipeline_durian import load_durian_pipeline, pick_device
    from flows.model_store import not_found, resolve_model

    device = pick_device(device, cpu_offload)  # the user's error, before any download
    folder = resolve_model(spec)
    try:
        return load_durian_pipeline(folder, device, cpu_offload=cpu_offload)
    except (OSError, ValueError, KeyError, TypeError) as err:
        msg = " ".join(str(err).split())[:200]
        raise not_found(spec, f"cannot load it: {type(err).__name__}: {msg}") from None


def parser_setting(name: str | None, weights: str | None) -> tuple[str, str | None]:
    """The face parser of ``durian animate`` / ``durian app``: ``--parser`` / ``--parser-weights``
    (weights alone: a folder is a SegFormer, a file a BiSeNet), else the project's
    ``preprocess.parser`` / ``parser_weights`` (relative to the project folder), else the
    offline ``landmarks`` — so a user with a checkpoint in params.yaml parses their own photos
    as their training data was parsed."""
    from flows.env import project_dir
    from flows.params import ParamsError
    from flows.project import read_params

    if name is None and weights is not None:
        name = "segformer" if Path(weights).is_dir() else "bisenet"
    if name is not None:
        return name, weights
    try:
        pre = read_params().preprocess
    except ParamsError:  # no (valid) project here: the offline default
        return "landmarks", None
    found = pre.parser_weights
    if found is not None and not Path(found).is_absolute():
        found = str(project_dir() / found)
    return pre.parser, found


def face_parser(name: str | None, weights: str | None, device: str = "cpu") -> Any:
    """The loaded parser of :func:`parser_setting` (``device`` for trained ones); a missing or
    wrong checkpoint raises DurianInputError naming it."""
    from durian.inference.errors import DurianInputError
    from preprocessing.parsing import load_parser

    name, weights = parser_setting(name, weights)
    try:
        return load_parser(name, weights, device=device)
    except (OSError, ValueError) as err:
        raise DurianInputError(f"face parser {name!r}: {err}") from None


def parser_note(parser: Any) -> str | None:
    """One line on what ``parser`` cannot see (the offline default), or None."""
    from preprocessing.parsing import unseen_categories

    unseen = unseen_categories(parser)
    if not unseen:
        return None
    return (
        f"face parser '{parser.name}' cannot see {', '.join(unseen)} in your images: name "
        "such an attribute's category only with exact labels (<image>.gt.npz) or a trained "
        "parser (--parser bisenet|segformer --parser-weights …)"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--cpu-offload`` (``durian animate`` and ``durian app``)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep the weights on the CPU and move each phase's parts to the GPU (less GPU "
        "memory, slower)",
    )


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
    add_device_arguments(parser)
    parser.add_argument(
        "--arcface-model", metavar="ONNX",
        help="ArcFace ONNX file, for a model trained on ArcFace identity embeddings",
    )  # fmt: skip
    parser.add_argument(
        "--side-by-side", action="store_true", help="portrait | attributes | driving | result"
    )
    add_parser_arguments(parser)
    parser.set_defaults(func=cmd_animate)
    return parser


def add_parser_arguments(parser: argparse.ArgumentParser) -> None:
    """``--parser`` / ``--parser-weights`` (shared by ``durian animate`` and ``durian app``)."""
    parser.add_argument(
        "--parser", choices=("landmarks", "bisenet", "segformer"),
        help="face parser (default: the project's preprocess.parser, else landmarks)",
    )  # fmt: skip
    parser.add_argument(
        "--parser-weights", metavar="FILE|DIR",
        help="its checkpoint: bisenet 79999_iter.pth (or a .pt2/TorchScript export), segformer "
        "a Hugging Face folder (default: the project's preprocess.parser_weights)",
    )  # fmt: skip


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``animate`` on ``durian``'s subcommands."""
    parser = subparsers.add_parser(
        "animate",
        help="animate a portrait with attributes from other images",
        description="Animate a portrait wearing attributes (hair, glasses, …) taken from other "
        "images, driven by a video or a motion preset.",
    )
    return add_arguments(parser)


def run(args: argparse.Namespace) -> Path:
    """Do the work of ``durian animate``; raises DurianInputError / ModelNotFoundError."""
    from durian.inference import animate, parse_attribute_spec
    from durian.inference.animate import check_driving
    from durian.inference.errors import DurianInputError
    from durian.inference.prepare import Preparer, check_alpha
    from preprocessing.video import write_video

    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise DurianInputError(f"--out must name an .mp4 file, got '{out.name}'")
    # Cheap checks first: a typo should not wait for the model to load.
    attributes = [parse_attribute_spec(a) for a in args.attribute]
    check_alpha(args.alpha, args.alpha_ramp, len(attributes))
    check_driving(args.driving)
    # The parser before the model: a wrong checkpoint is found before a long model load.
    parser = face_parser(args.parser, args.parser_weights, args.device)
    if note := parser_note(parser):
        print(f"note: {note}", file=sys.stderr)
    pipe = load_pipeline(args.model, args.device, cpu_offload=args.cpu_offload)
    size = int(pipe.model.config.resolution)
    with Preparer(size, parser=parser, arcface_model=args.arcface_model) as preparer:
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
            preparer=preparer,
        )
    write_video(out, result.frames, result.fps)
    return out


def cmd_animate(args: argparse.Namespace) -> int:
    from durian.inference.errors import DurianInputError
    from flows.model_store import ModelNotFoundError

    # mediapipe's native log lines are silenced where its models are made (preprocessing.mp_models).
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
