"""A Hugging Face SegFormer face parser (e.g. ``jonathandinu/face-parsing``) from a local folder.

The folder is what ``save_pretrained`` / a hub download holds: ``config.json`` (with
``id2label``), ``model.safetensors`` or ``pytorch_model.bin``, optionally
``preprocessor_config.json`` (input size, mean/std). It is loaded through ``transformers``
(``SegformerForSemanticSegmentation.from_pretrained``, offline) and checked strictly: a missing,
unexpected or mis-shaped tensor fails with the file named.

Its classes are CelebAMask-HQ's 19 in another order than ours; they are mapped to our schema by
the names in the folder's ``id2label``. One published revision of ``jonathandinu/face-parsing``
(before its commit 373bfce, "Fix labels") shipped an ``id2label`` that does not match its
weights (names ending in ``.png``, in the annotation files' order); that exact list is
recognised and replaced by the corrected one, with a warning. SegFormer predicts at 1/4 of the
input; the logits are resized to each frame bilinearly before the argmax.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

from preprocessing.bisenet import CheckpointError
from preprocessing.torch_parser import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TorchParser,
    files_sha256,
    pick_device,
)

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# jonathandinu/face-parsing's config.json before 373bfce (labels wrong for its weights) and the
# corrected labels of that commit, id order.
PRE_FIX_LABELS = (
    "background", "skin.png", "nose.png", "r_eye.png", "l_eye.png", "r_brow.png", "l_brow.png",
    "r_ear.png", "l_ear.png", "mouth.png", "u_lip.png", "l_lip.png", "neck.png", "hair.png",
    "neck_l.png", "cloth.png", "eye_g.png", "hat.png", "ear_r.png",
)  # fmt: skip
FIXED_LABELS = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear",
    "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path.name}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: not a JSON object")
    return data


def model_class_names(config: dict[str, Any], where: str = "config.json") -> list[str]:
    """The class name of each output id, from a SegFormer ``config.json``'s ``id2label``
    (``.png`` suffixes of CelebAMask-HQ's annotation file names dropped; the known wrong
    pre-fix list of ``jonathandinu/face-parsing`` replaced by its correction)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise CheckpointError(f"{where}: no id2label")
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise CheckpointError(f"{where}: id2label keys must be integers") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise CheckpointError(f"{where}: id2label ids must be 0..{len(by_id) - 1}")
    names = [by_id[i] for i in range(len(by_id))]
    if tuple(names) == PRE_FIX_LABELS:
        log.warning(
            "%s: this is jonathandinu/face-parsing's id2label before its 'Fix labels' commit "
            "(373bfce), which does not match the weights; using the corrected labels",
            where,
        )
        return list(FIXED_LABELS)
    return [n.removesuffix(".png") for n in names]


def load_segformer(folder: str | os.PathLike, device: str = "cpu") -> tuple[Any, Path]:
    """(the model in eval mode, its weights file) from a local SegFormer folder, every tensor
    loaded strictly; raises :class:`CheckpointError` naming the file and what does not match."""
    from safetensors import SafetensorError
    from transformers import SegformerForSemanticSegmentation

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"SegFormer parser folder {folder} not found (a folder with config.json and "
            f"{' or '.join(WEIGHT_FILES)})"
        )
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if config is None or config.get("model_type") != "segformer":
        raise CheckpointError(f"{folder.name}/config.json: not a SegFormer config (model_type)")
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder.name}: no weights ({' or '.join(WEIGHT_FILES)})")
    where = f"{folder.name}/{weights.name}"
    try:
        model, info = SegformerForSemanticSegmentation.from_pretrained(
            folder, local_files_only=True, output_loading_info=True,
            # Shape mismatches are reported below with the tensors named, not re-initialised.
            ignore_mismatched_sizes=True,
        )  # fmt: skip
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as err:  # fmt: skip
        why = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{where}: not loadable (truncated or damaged?): {why}") from None
    problems = []
    for what, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"])):
        if keys:
            names = sorted(keys)
            more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
            problems.append(f"{len(names)} {what} tensors: {', '.join(names[:4])}{more}")
    if mismatched := sorted(info["mismatched_keys"]):
        shown = [f"{k} {tuple(a)} instead of {tuple(b)}" for k, a, b in mismatched[:4]]
        problems.append(f"{len(mismatched)} shape mismatches: {', '.join(shown)}")
    if problems:
        raise CheckpointError(f"{where} does not match its config.json: {'; '.join(problems)}")
    return model.eval().to(device), weights


class SegFormerParser(TorchParser):
    """``preprocess.parser: segformer``: a local SegFormer folder (see module doc)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        batch_size: int = 4,
        device: str = "cpu",
        derive_beard: bool = True,
    ) -> None:
        folder = Path(folder)
        self._settings = {"folder": str(folder), "batch_size": batch_size, "device": device,
                          "derive_beard": derive_beard}  # fmt: skip
        model, weights = load_segformer(folder, pick_device(device))
        config = _read_json(folder / "config.json")
        names = model_class_names(config, f"{folder.name}/config.json")
        size, mean, std = 512, IMAGENET_MEAN, IMAGENET_STD
        if (pre := folder / "preprocessor_config.json").is_file():
            p = _read_json(pre)
            size_spec = p.get("size", {})
            if isinstance(size_spec, dict):
                size = int(size_spec.get("height", size_spec.get("shortest_edge", size)))
            elif isinstance(size_spec, int):
                size = size_spec
            mean, std = p.get("image_mean", mean), p.get("image_std", std)
        super().__init__(
            model,
            name="segformer",
            # The label map is part of what ran: a corrected config.json is another parser.
            version=files_sha256(weights, folder / "config.json")[:12],
            model_classes=names,
            input_size=size,
            batch_size=batch_size,
            mean=mean,
            std=std,
            derive_beard=derive_beard,
            device=device,
        )

    def __reduce__(self) -> tuple:  # reload from the folder (Ray workers, spawn), not weights
        return (_rebuild, (self._settings,))


def _rebuild(settings: dict[str, Any]) -> SegFormerParser:
    return SegFormerParser(**settings)
