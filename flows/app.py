"""``durian app``: the animate command as a web page (Gradio), on 127.0.0.1 by default.

    durian app [--model models:/durian@champion | PATH] [--host 127.0.0.1] [--port 7860]
               [--device auto|cpu|cuda] [--cpu-offload] [--parser landmarks|bisenet|segformer]
               [--parser-weights FILE|DIR]

The page takes a portrait (upload or webcam still), up to four attribute images each with a
category picker, a driving video or a motion preset, and the composition / interpolation
controls; it shows progress while it works, then the result video with a download link.
Input errors appear in the page as one line. Faces are parsed as ``durian animate`` parses them
(the project's ``preprocess.parser`` unless ``--parser`` says otherwise); the page says which
categories that parser cannot see.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

# Gradio reads these at import: no usage statistics and no version check over the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")

MAX_ATTRIBUTES = 4
AUTO = "auto (what the parser finds)"


def _attribute_specs(values: list[Any]) -> list[tuple[Any, str | None]]:
    """(image, category) pairs from the slot widgets; empty slots are skipped."""
    specs = []
    for image, category in zip(values[0::2], values[1::2], strict=True):
        if image is None:
            continue
        specs.append((image, None if category in (None, "", AUTO) else category))
    return specs


def generate(
    pipeline: Any,
    work_dir: Path,
    portrait: Any,
    attributes: list[tuple[Any, str | None]],
    driving_kind: str,
    preset: str,
    video: str | None,
    mode: str,
    alpha: float,
    ramp: bool,
    frames: int,
    steps: int,
    guidance: float,
    seed: int,
    side_by_side: bool,
    preparer: Any = None,
) -> tuple[str | None, str]:
    """One request → (path of the written MP4 or None, status line); ``preparer``: the app's
    :class:`~durian.inference.prepare.Preparer` (its parser), None for a fresh default one."""
    from durian.inference import animate
    from durian.inference.errors import DurianInputError
    from preprocessing.video import write_video

    try:
        if portrait is None:
            raise DurianInputError("give a portrait image (upload one or take a webcam still)")
        if not attributes:
            raise DurianInputError("give at least one attribute image")
        if driving_kind == "video":
            if not video:
                raise DurianInputError("give a driving video, or choose a preset")
            driving = video
        else:
            driving = preset
        interpolate = mode == "interpolation"
        result = animate(
            pipeline,
            portrait,
            attributes,
            driving,
            alpha=None if not interpolate or ramp else float(alpha),
            alpha_ramp=interpolate and ramp,
            frames=int(frames),
            steps=int(steps),
            guidance=float(guidance),
            seed=int(seed),
            side_by_side=side_by_side,
            preparer=preparer,
        )
    except DurianInputError as err:
        return None, f"error: {err}"
    out = write_video(work_dir / f"durian-{uuid.uuid4().hex[:10]}.mp4", result.frames, result.fps)
    what = ", ".join(result.categories)
    how = "interpolated" if result.alpha is not None else "composed"
    source = f"video '{Path(driving).name}'" if driving_kind == "video" else f"preset '{driving}'"
    return str(out), (
        f"done: {len(result.frames)} frames at {result.fps:g} fps, {how}: {what}, "
        f"driven by {source}"
    )


def parser_line(parser: Any) -> str:
    """The page's line on the face parser: its name and what it cannot see."""
    from flows.animate import parser_note

    note = parser_note(parser)
    what = f"Face parser: **{parser.name}**"
    return f"{what} — {note}." if note else f"{what} (sees every category)."


def build_app(pipeline: Any, work_dir: str | os.PathLike | None = None, parser: Any = None) -> Any:
    """The Gradio Blocks page around ``pipeline`` (a DurianPipeline); ``parser``: the face
    parser object (default: the offline ``landmarks`` one)."""
    import gradio as gr

    from durian.inference.prepare import Preparer
    from durian.inference.presets import PRESETS
    from preprocessing.labels import CATEGORIES
    from preprocessing.parsing import load_parser

    work = Path(work_dir or tempfile.mkdtemp(prefix="durian-app-"))
    work.mkdir(parents=True, exist_ok=True)
    # One Preparer for the app's life: the parser (and face models) load once, not per request.
    parser = parser if parser is not None else load_parser("landmarks")
    preparer = Preparer(int(pipeline.model.config.resolution), parser=parser)

    with gr.Blocks(title="Durian", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Durian — portrait animation with attribute transfer\n"
            "A portrait, attribute images (hair, glasses, hat, earrings, beard) and a driving "
            "video or motion preset → the portrait, animated, wearing the attributes."
        )
        gr.Markdown(parser_line(parser), elem_id="parser")
        with gr.Row():
            with gr.Column():
                portrait = gr.Image(
                    label="Portrait", sources=["upload", "webcam"], type="filepath",
                    elem_id="portrait", height=260,
                )  # fmt: skip
            with gr.Column():
                driving_kind = gr.Radio(
                    ["preset", "video"], value="preset", label="Driving", elem_id="driving-kind"
                )
                preset = gr.Dropdown(
                    list(PRESETS), value="nod", label="Motion preset", elem_id="preset"
                )
                video = gr.Video(
                    label="Driving video", sources=["upload"], elem_id="driving-video", height=200
                )
        gr.Markdown("### Attributes")
        slots: list[Any] = []
        with gr.Row():
            for k in range(MAX_ATTRIBUTES):
                with gr.Column(min_width=160):
                    slots.append(
                        gr.Image(
                            label=f"Attribute {k + 1}", sources=["upload"], type="filepath",
                            elem_id=f"attribute-{k + 1}", height=180,
                        )
                    )  # fmt: skip
                    slots.append(
                        gr.Dropdown(
                            [AUTO, *CATEGORIES], value=AUTO, label="Category",
                            elem_id=f"category-{k + 1}",
                        )
                    )  # fmt: skip
        with gr.Row():
            mode = gr.Radio(
                ["composition", "interpolation"], value="composition", label="Mode",
                info="composition: all attributes at once; interpolation: between attributes 1 "
                "and 2", elem_id="mode",
            )  # fmt: skip
            alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="α", elem_id="alpha")
            ramp = gr.Checkbox(label="ramp α from 0 to 1 over the video", elem_id="ramp")
        with gr.Row():
            frames = gr.Slider(1, 240, value=24, step=1, label="Frames", elem_id="frames")
            steps = gr.Slider(1, 100, value=25, step=1, label="Denoising steps", elem_id="steps")
            guidance = gr.Slider(1.0, 10.0, value=3.5, step=0.5, label="Guidance",
                                 elem_id="guidance")  # fmt: skip
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            side = gr.Checkbox(label="side by side", elem_id="side-by-side")
        # Uploading a driving video means driving with it.
        video.change(lambda v: "video" if v else "preset", inputs=video, outputs=driving_kind)
        run = gr.Button("Animate", variant="primary", elem_id="run")
        status = gr.Markdown("", elem_id="status")
        result = gr.Video(label="Result", elem_id="result", buttons=["download"], autoplay=True)
        download = gr.File(label="Download", elem_id="download")

        tracker = gr.Progress(track_tqdm=True)  # follows the preparing / denoising bars

        def on_run(v: dict, progress: Any = tracker) -> tuple:
            progress(0, desc="preparing")
            path, message = generate(
                pipeline, work, v[portrait], _attribute_specs([v[s] for s in slots]),
                v[driving_kind], v[preset], v[video], v[mode], v[alpha], v[ramp], v[frames],
                v[steps], v[guidance], int(v[seed] or 0), v[side], preparer,
            )  # fmt: skip
            return path, path, message

        # A set of inputs: the function gets one dict keyed by component.
        run.click(
            on_run,
            inputs={portrait, driving_kind, preset, video, mode, alpha, ramp, frames, steps,
                    guidance, seed, side, *slots},
            outputs=[result, download, status],
            concurrency_limit=1,  # one pipeline: requests take turns
        )  # fmt: skip
    demo.durian_work_dir = work  # where results are written (served by launch)
    demo.durian_preparer = preparer
    return demo


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> Any:
    """Start serving; ``prevent_thread_lock=True`` in kwargs returns at once (tests)."""
    return demo.queue().launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        show_error=True,
        quiet=True,
        allowed_paths=[str(demo.durian_work_dir)],
        **kwargs,
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from flows.animate import DEFAULT_MODEL, add_device_arguments, add_parser_arguments

    parser.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="URI|PATH",
        help=f"registry URI or local model folder (default {DEFAULT_MODEL})",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default local)")
    parser.add_argument("--port", type=int, default=7860)
    add_device_arguments(parser)
    add_parser_arguments(parser)
    parser.set_defaults(func=cmd_app)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``app`` on ``durian``'s subcommands."""
    parser = subparsers.add_parser(
        "app", help="the animate web app (Gradio, on 127.0.0.1)",
        description="Serve a web page to animate portraits with attributes.",
    )  # fmt: skip
    return add_arguments(parser)


def cmd_app(args: argparse.Namespace) -> int:
    from durian.inference.errors import DurianInputError
    from flows.animate import face_parser, load_pipeline, parser_note
    from flows.model_store import ModelNotFoundError

    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web app needs gradio: pip install gradio==6.31.0", file=sys.stderr)
        return 1
    try:
        parser = face_parser(args.parser, args.parser_weights, args.device)
        pipe = load_pipeline(args.model, args.device, cpu_offload=args.cpu_offload)
    except (DurianInputError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if note := parser_note(parser):
        print(f"note: {note}", file=sys.stderr)
    demo = build_app(pipe, parser=parser)
    print(f"durian app on http://{args.host}:{args.port}  (Ctrl+C stops it)")
    launch(demo, args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    import flows  # noqa: F401  (offline/loopback environment first)

    args = add_arguments(argparse.ArgumentParser(prog="durian app")).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
