"""``durian status``: what the pipeline has produced so far, read from its contract files."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from flows.project import paths


def _count(path, column: str | None = None) -> str:
    if not path.exists():
        return "missing"
    table = pq.read_table(path)
    if column is None or column not in table.column_names:
        return f"{table.num_rows} rows"
    counts: dict[str, int] = {}
    for value in table.column(column).to_pylist():
        counts[value] = counts.get(value, 0) + 1
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return f"{table.num_rows} rows ({detail})"


def status_lines() -> list[str]:
    p = paths()
    lines = [f"project      {p.root}"]
    raw = sorted(p.raw.glob("*.mp4")) if p.raw.exists() else []
    lines.append(f"raw videos   {len(raw)} in {p.raw}")
    lines.append(f"videos       {_count(p.videos_manifest, 'status')}")
    lines.append(f"clips        {_count(p.clips_manifest)}")
    shards = sorted(p.shards.glob("*.tar")) if p.shards.exists() else []
    lines.append(f"shards       {len(shards)} tar files; index {_count(p.shard_index, 'split')}")
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
