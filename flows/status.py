"""``durian status``: what the pipeline has produced so far, read from its contract files."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from flows.project import paths
from preprocessing.shard_index import committed_parts, has_index, read_index_table


def _rows(table: pa.Table, column: str | None = None) -> str:
    if column is None or column not in table.column_names:
        return f"{table.num_rows} rows"
    counts = Counter(table.column(column).to_pylist())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"{table.num_rows} rows ({detail})"


def _count(path, column: str | None = None) -> str:
    return _rows(pq.read_table(path), column) if path.exists() else "missing"


def _index_count(folder) -> str:
    if not has_index(folder):
        return "missing"
    table = read_index_table(folder)
    return f"{_rows(table, 'split')} in {len(committed_parts(folder))} parts"


def status_lines() -> list[str]:
    p = paths()
    lines = [f"project      {p.root}"]
    raw = sorted(p.raw.glob("*.mp4")) if p.raw.exists() else []
    lines.append(f"raw videos   {len(raw)} in {p.raw}")
    lines.append(f"videos       {_count(p.videos_manifest, 'status')}")
    lines.append(f"clips        {_count(p.clips_manifest)}")
    shards = sorted(p.shards.glob("*.tar")) if p.shards.exists() else []
    lines.append(f"shards       {len(shards)} tar files; index {_index_count(p.shards)}")
    if p.train_info.exists():
        info = json.loads(p.train_info.read_text())
        lines.append(
            f"model        {p.model} (steps {info.get('steps')}, "
            f"final loss {info.get('final_loss'):.4f}, run {info.get('mlflow_run_id')})"
        )
    else:
        lines.append("model        not trained yet")
    if p.metrics.exists():
        metrics = json.loads(p.metrics.read_text())
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())
                          if isinstance(v, int | float))
        lines.append(f"metrics      {shown}")
    if p.registered.exists():
        reg = json.loads(p.registered.read_text())
        lines.append(
            f"registry     {reg.get('name')} v{reg.get('version')} "
            f"aliases {', '.join(reg.get('aliases', []))}"
        )
    else:
        lines.append("registry     nothing registered yet")
    return lines
