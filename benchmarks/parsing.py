"""Face parsers on synthetic portraits: per-class IoU against the exact labels, and images/s.

    python benchmarks/parsing.py [--n 16] [--size 256] [--device cpu|cuda|auto] [--threads N]
                                 [--bisenet 79999_iter.pth] [--segformer FOLDER]
                                 [--parsers landmarks bisenet segformer]

Every parser runs on the same drawn portraits (random identities, hair, glasses, hats and
beards; ``synthetic``), given the portraits' exact landmarks, so only parsing is measured (no
face detection). Prints, per parser, images/s (after one warm-up image) and the per-class IoU
(:func:`preprocessing.parsing.parser_agreement`, averaged over the portraits that show the
class). A trained parser without its checkpoint (``--bisenet`` / ``--segformer``) runs with
random weights at its real size: it is timed, but its IoU means nothing and is not printed.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def portraits(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, S, S, 3), exact labels (N, S, S), landmarks (N, 478, 3))."""
    from synthetic import random_attributes, random_identity, random_pose, render_frame

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        attributes = random_attributes(rng, {"glasses": 0.5, "hat": 0.4, "beard": 0.5})
        out.append(render_frame(random_identity(rng), attributes, random_pose(rng), size, k))
    images, labels, landmarks = (np.stack(x) for x in zip(*out, strict=True))
    return images, labels, landmarks


def random_bisenet(folder: Path) -> Path:
    import torch

    from preprocessing.bisenet import BiSeNet

    torch.manual_seed(0)
    path = folder / "random_bisenet.pth"
    torch.save(BiSeNet().state_dict(), path)
    return path


def random_segformer(folder: Path) -> Path:
    """A random-weight SegFormer of jonathandinu/face-parsing's size (mit-b5, 512²)."""
    import json

    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from preprocessing.segformer import FIXED_LABELS

    torch.manual_seed(0)
    id2label = dict(enumerate(FIXED_LABELS))
    config = SegformerConfig(
        hidden_sizes=[64, 128, 320, 512], depths=[3, 6, 40, 3], decoder_hidden_size=768,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )  # fmt: skip
    out = folder / "random_segformer"
    SegformerForSemanticSegmentation(config).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 512, "width": 512}})
    )
    return out


def run(parser, images: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """(labels (N, S, S), images/s after a one-image warm-up)."""
    parser.parse(images[:1], landmarks[:1])
    start = time.perf_counter()
    labels = np.stack(
        [parser.parse(im[None], lm[None])[0] for im, lm in zip(images, landmarks, strict=True)]
    )
    return labels, len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="portraits")
    ap.add_argument("--size", type=int, default=256, help="portrait side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--bisenet", metavar="PTH", help="79999_iter.pth (default: random weights)")
    ap.add_argument("--segformer", metavar="DIR", help="SegFormer folder (default: random)")
    ap.add_argument("--parsers", nargs="+", default=["landmarks", "bisenet", "segformer"])
    args = ap.parse_args(argv)

    import torch

    from preprocessing import mp_models
    from preprocessing.labels import LABELS
    from preprocessing.parsing import load_parser, parser_agreement, summarize_agreement

    if args.threads:
        torch.set_num_threads(args.threads)
    images, truth, landmarks = portraits(args.n, args.size, args.seed)
    shown = sorted({int(c) for c in np.unique(truth)})
    print(f"{args.n} synthetic portraits at {args.size}², classes present: "
          f"{', '.join(LABELS[c] for c in shown)}; device {args.device}, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parsers:
            weights, real = None, True
            if name == "landmarks" and not all(v == "ok" for v in mp_models.check().values()):
                print(f"landmarks: skipped (run `{mp_models.FETCH_COMMAND}`)")
                continue
            if name == "bisenet":
                weights, real = args.bisenet or random_bisenet(Path(tmp)), bool(args.bisenet)
            if name == "segformer":
                weights, real = args.segformer or random_segformer(Path(tmp)), bool(args.segformer)
            parser = load_parser(name, weights, device=args.device)
            labels, rate = run(parser, images, landmarks)
            close = getattr(parser, "close", None)
            if close is not None:
                close()
            summary = summarize_agreement(
                [parser_agreement(p, t) for p, t in zip(labels, truth, strict=True)]
            )
            rows.append((name, parser.version, rate, summary if real else None))

    print(f"\n{'parser':10s} {'version':28s} {'images/s':>9s} {'mIoU':>6s}")
    for name, version, rate, summary in rows:
        miou = f"{summary['miou']:6.3f}" if summary else "   n/a"
        note = "" if summary else "  (random weights: timed only)"
        print(f"{name:10s} {version[:28]:28s} {rate:9.2f} {miou}{note}")
    for name, _, _, summary in rows:
        if summary:
            per = ", ".join(f"{c} {v:.2f}" for c, v in summary["iou"].items())
            print(f"\n{name} per-class IoU: {per}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
