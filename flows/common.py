"""What every flow shares: params, project paths, a one-line error exit for ``__main__``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from durian.config import PIPELINE_STAGES, Params, ParamsError, load_params
from flows.env import project_dir

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
    def shard_index(self) -> Path:
        return self.shards / "index.parquet"

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
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_main(flow_fn: Callable[..., Any]) -> None:
    """``python -m flows.X``: run the flow; bad input exits 1 with one line, not a stack trace."""
    try:
        read_params()  # fail fast, before Prefect starts anything
        flow_fn()
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
