"""The project a flow runs in: its params, its paths, the one-line error exit for ``__main__``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.env import project_dir
from flows.params import PIPELINE_STAGES, Params, ParamsError, load_params
from flows.stop import stop_guard

STAGES = PIPELINE_STAGES


@dataclass(frozen=True)
class Paths:
    """The stage contracts of the architecture note, as paths under the project dir."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "manifest"

    @property
    def videos_manifest(self) -> Path:
        return self.manifest / "videos.parquet"

    @property
    def clips_manifest(self) -> Path:
        return self.manifest / "clips.parquet"

    @property
    def shards(self) -> Path:
        return self.root / "data" / "shards"

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "models" / "durian"

    @property
    def train_info(self) -> Path:
        return self.root / "models" / "train.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def registered(self) -> Path:
        return self.root / "models" / "registered.json"


def paths(root: Path | None = None) -> Paths:
    return Paths(root or project_dir())


def params_path() -> Path:
    return Path(os.environ.get("DURIAN_PARAMS", project_dir() / "params.yaml"))


def read_params(path: str | os.PathLike | None = None) -> Params:
    return load_params(path or params_path())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic JSON write so a killed stage never leaves a half-written contract file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:  # a stop between the two leaves no temporary behind
        tmp.unlink(missing_ok=True)


def run_main(flow_fn: Callable[..., Any]) -> None:
    """``python -m flows.X``: run the flow; bad input exits 1 with one line, not a stack trace.

    Ctrl-C or SIGTERM ends it within seconds, saying what was finished (:mod:`flows.stop`).
    """
    what = str(getattr(flow_fn, "name", None) or getattr(flow_fn, "__name__", ""))
    what = what if what.isidentifier() else "durian"  # a lambda's name says nothing
    try:
        with stop_guard(what):
            read_params()  # fail fast, before Prefect starts anything
            flow_fn()
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
