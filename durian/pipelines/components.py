"""Frozen components kept apart from a saved model, and put back when it is loaded.

A pipeline folder holds its frozen components (the VAE; the image encoder when the model does
not train it) in ``vae/`` and ``image_encoder/``: the same bytes for every model trained on one
base (1.5 GB at SD size). A store of models (the MLflow registry, ``flows/component_store.py``)
may keep them once and ship a folder without them, naming each in ``frozen_components.json``
(``{"vae": {"uri": …, "sha256": …}, …}``); :func:`complete_pipeline_folder` puts them back
through the store's own download function, checked against their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

FROZEN_RECORD = "frozen_components.json"

# ``fetch(uri, dst)``: download what ``uri`` names into folder ``dst``; returns its local path.
Fetch = Callable[[str, Path], Path]


def folder_digest(folder: Path) -> str:
    """sha256 of a component folder: every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def fetch_whole(where: Path, fetch: Callable[[Path], Path]) -> None:
    """``fetch(tmp)`` writes into an empty sibling folder of ``where`` and returns the folder to
    keep (``tmp`` or one inside it), which becomes ``where``: whole or not at all. When another
    process put the same thing there first, its copy stays."""
    tmp = where.with_name(f".{where.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        got = fetch(tmp)
        try:
            os.replace(got, where)
        except OSError:
            if not where.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_checked(fetch: Fetch, uri: str, sha256: str, where: Path) -> None:
    """One stored component into ``where``, checked against its sha256."""

    def checked(tmp: Path) -> Path:
        got = fetch(uri, tmp)
        if folder_digest(got) != sha256:
            raise ValueError(f"{uri} does not hold the component its model names ({sha256})")
        return got

    fetch_whole(where, checked)


def complete_pipeline_folder(folder: Path, fetch: Fetch, store: Path) -> Path:
    """Put back the frozen components ``folder``'s ``frozen_components.json`` names but the
    folder does not hold: each fetched once into ``store/<sha256>/<name>`` and linked from the
    folder (models sharing a component share the copy). A folder with no record is returned as
    it is. Returns ``folder``."""
    record = folder / FROZEN_RECORD
    if not record.is_file():
        return folder
    for name, entry in json.loads(record.read_text()).items():
        target = folder / name
        if target.is_dir():
            continue
        where = store / entry["sha256"] / name
        if not where.is_dir():
            where.parent.mkdir(parents=True, exist_ok=True)
            _fetch_checked(fetch, entry["uri"], entry["sha256"], where)
        target.unlink(missing_ok=True)  # a link left dangling by a removed store
        try:
            target.symlink_to(where.resolve(), target_is_directory=True)
        except FileExistsError:  # another process linked it first
            pass
    return folder


def completed_view(folder: Path, fetch: Fetch, work: Path) -> Path:
    """``folder`` completed without touching it: a folder in ``work`` of links to its entries
    and to its frozen components fetched into ``work`` (for a folder that must stay as it is,
    such as an MLflow model directory that is still being logged). ``folder`` itself when it
    names no stored components."""
    if not (folder / FROZEN_RECORD).is_file():
        return folder
    view = work / folder.name
    view.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        link = view / entry.name
        if not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return complete_pipeline_folder(view, fetch, work / "components")
