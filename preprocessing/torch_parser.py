"""Trained face parsers as torch modules: frames → normalised batches → logits → label ids.

One runner serves every trained parser (a TorchScript / ``.pt2`` export, face-parsing.PyTorch's
BiSeNet, a SegFormer folder): crops are resized to the model's square input, normalised (ImageNet
mean/std unless the model says otherwise), run in batches, the logits resized back to each
frame's size and argmax'ed, and the model's class ids mapped to the label schema of
``preprocessing.labels`` by class name. Where the model has no beard class, class 19 is derived
from the lower face (:mod:`preprocessing.beard`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.beard import add_beard
from preprocessing.labels import CLASS, LABELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def class_map_for(names: Sequence[str], where: str = "the model") -> np.ndarray:
    """Output id → id of our schema, for a model whose output ids are the classes ``names``
    (CelebAMask-HQ names as our schema spells them); raises ValueError naming the ones we do
    not know."""
    unknown = [n for n in names if n not in CLASS]
    if unknown:
        raise ValueError(
            f"{where} has classes the label schema does not know: {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(LABELS)})"
        )
    return np.array([CLASS[n] for n in names], np.uint8)


def labels_from_logits(
    logits: Any, class_map: np.ndarray | None, size: tuple[int, int] | None = None
) -> np.ndarray:
    """(N, C, h, w) logits (torch) → (N, H, W) uint8 ids of our schema: resized to ``size``
    (H, W) first (bilinear, antialiased when shrinking), argmax over C, then ``class_map``
    (the model's id → ours; None: the ids are ours already)."""
    import torch
    import torch.nn.functional as F

    logits = torch.as_tensor(logits)
    if size is not None and tuple(logits.shape[2:]) != tuple(size):
        shrink = size[0] < logits.shape[2] or size[1] < logits.shape[3]
        logits = F.interpolate(
            logits.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink
        )
    ids = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
    return class_map[ids] if class_map is not None else ids


def files_sha256(*paths: str | os.PathLike) -> str:
    """sha256 (hex) of the files' bytes, in order: what a parser's ``version`` is made of."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; other values as given."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TorchParser:
    """A face parser around a torch ``module`` mapping (N, 3, S, S) float32 RGB, normalised with
    ``mean``/``std``, to logits (N, C, h, w) (or a tuple/list whose first element is that, as
    BiSeNet exports return) over the classes ``model_classes`` (names in our schema's spelling;
    None: our 19/20 classes in our order).

    ``classes`` (recorded in shard metadata) is our full schema with ``beard`` when the model
    outputs one or ``derive_beard`` adds it (:mod:`preprocessing.beard`, needs the landmarks),
    else the 19 CelebAMask-HQ classes. ``pad_batch``: pad the last batch to ``batch_size``
    (exports traced with a fixed batch dimension).
    """

    name: str
    version: str

    def __init__(
        self,
        module: Any,
        *,
        name: str,
        version: str,
        model_classes: Sequence[str] | None = None,
        class_map: Sequence[int] | np.ndarray | None = None,
        input_size: int = 512,
        batch_size: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pad_batch: bool = False,
        derive_beard: bool = True,
        device: str = "cpu",
    ) -> None:
        self.module = module
        self.name = name
        self.version = version
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.pad_batch = pad_batch
        self.device = pick_device(device)
        if class_map is not None:
            self.class_map: np.ndarray | None = np.asarray(class_map, np.uint8)
        elif model_classes is not None:
            self.class_map = class_map_for(model_classes, f"parser {name!r}")
        else:
            self.class_map = None
        outputs_beard = (
            self.class_map is not None and CLASS["beard"] in set(self.class_map.tolist())
        ) or (model_classes is not None and "beard" in model_classes)
        self.derive_beard = derive_beard and not outputs_beard
        self.classes = list(LABELS) if (outputs_beard or self.derive_beard) else list(LABELS[:19])
        # What it can output (what the Preparer asks): the classes its ids map to, and the beard.
        outputs = self.classes if self.class_map is None else [LABELS[i] for i in self.class_map]
        self.detects = frozenset(outputs) | ({"beard"} if self.derive_beard else set())

    def logits(self, batch: np.ndarray) -> Any:
        """(N, S, S, 3) uint8 RGB at the input size → the module's logits (N, C, h, w)."""
        import torch

        x = (batch.astype(np.float32) / 255.0 - self.mean) / self.std
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)
        with torch.inference_mode():
            y = self.module(x)
        if isinstance(y, tuple | list):
            y = y[0]
        return getattr(y, "logits", y)  # transformers' outputs carry them as .logits

    def parse(self, frames: np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray:
        """frames (T, H, W, 3) uint8 RGB → (T, H, W) uint8 labels; ``landmarks`` (T, 478, 3)
        in frame pixels let the beard be derived (without them, none is)."""
        import cv2

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"need frames (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
        t, h, w, _ = frames.shape
        s = self.input_size
        out = np.empty((t, h, w), np.uint8)
        for start in range(0, t, self.batch_size):
            chunk = frames[start : start + self.batch_size]
            x = np.stack([cv2.resize(f, (s, s), interpolation=cv2.INTER_LINEAR) for f in chunk])
            n = len(x)
            if self.pad_batch and n < self.batch_size:
                x = np.concatenate([x, np.repeat(x[-1:], self.batch_size - n, 0)])
            logits = self.logits(x)[:n]
            for i in range(n):  # one frame's logits at a time at full size (memory)
                out[start + i] = labels_from_logits(logits[i : i + 1], self.class_map, (h, w))[0]
        if self.derive_beard and landmarks is not None:
            out = add_beard(frames, np.asarray(landmarks, np.float32), out)
        return out
