"""The shard index as append-only parts: what each worker's batch wrote, committed whole.

Layout of a shard folder (the shards themselves: :mod:`preprocessing.shards`)::

    train-p1a2b3c4d5e-000000.tar  val-p1a2b3c4d5e-000000.tar   ← shards of part p1a2b3c4d5e
    rejected/p1a2b3c4d5e.parquet  ← the part's rejected clips, with their reasons
    index/p1a2b3c4d5e.parquet     ← the part's samples: its commit marker, written last

A *part* is one batch of videos preprocessed by one worker, which writes the part's shards
itself (:func:`write_part`) and then its two Parquet files, each atomically, the index part
last. The index is the union of the index parts (read as one table), the rejections those of
committed parts. So no step ever rewrites earlier rows, and a kill at any point leaves each
part committed or not: :func:`clean_uncommitted` removes what an uncommitted part left (partial
or complete shards, its rejections) and the clips of that part are simply pending again. A
key is in at most one committed part: a batch holds only pending clips, and a part name is
a digest of the clips it holds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from preprocessing.ingest import write_parquet
from preprocessing.shards import (
    PARTIAL_SUFFIX,
    ShardWriter,
    clean_partial_shards,
    list_shards,
)

INDEX_DIR = "index"
REJECTED_DIR = "rejected"
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # file name inside the shard folder
        ("split", pa.string()),
        ("video_id", pa.string()),
        ("clip_index", pa.int32()),
        ("num_frames", pa.int32()),
        ("worker", pa.string()),  # where the part was made (a Ray node id, or a host name)
    ]
)
REJECTED_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("video_id", pa.string()), ("path", pa.string()),
     ("reason", pa.string()), ("detail", pa.string())]
)


def part_name(clip_ids: Iterable[str]) -> str:
    """``p`` + 10 hex of the sorted clip ids: the same batch gets the same name on a retry."""
    text = "\n".join(sorted(clip_ids))
    return "p" + hashlib.sha256(text.encode()).hexdigest()[:10]


def _part_path(folder: Path, kind: str, part: str) -> Path:
    return folder / kind / f"{part}.parquet"


def committed_parts(folder: str | os.PathLike) -> set[str]:
    directory = Path(folder) / INDEX_DIR
    if not directory.is_dir():
        return set()
    return {p.stem for p in directory.glob("*.parquet") if not p.name.startswith(".")}


def commit_part(
    folder: str | os.PathLike,
    part: str,
    index_rows: Sequence[dict[str, Any]],
    rejected_rows: Sequence[dict[str, Any]] = (),
) -> None:
    """Write the part's rejections, then its index part (the commit), each atomically."""
    folder = Path(folder)
    keys = [r["key"] for r in index_rows]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"duplicate keys in part {part}: {dup}")
    write_parquet(rejected_rows, _part_path(folder, REJECTED_DIR, part), REJECTED_SCHEMA)
    write_parquet(index_rows, _part_path(folder, INDEX_DIR, part), INDEX_SCHEMA)


def _read_parts(directory: Path, schema: pa.Schema, parts: set[str] | None = None) -> pa.Table:
    if not directory.is_dir():
        return schema.empty_table()
    files = sorted(str(p) for p in directory.glob("*.parquet")
                   if not p.name.startswith(".") and (parts is None or p.stem in parts))
    if not files:
        return schema.empty_table()
    return pads.dataset(files, schema=schema, format="parquet").to_table()


def read_index_table(folder: str | os.PathLike) -> pa.Table:
    """Every committed sample (the index parts as one table, in part-name order)."""
    return _read_parts(Path(folder) / INDEX_DIR, INDEX_SCHEMA)


def read_index(folder: str | os.PathLike) -> list[dict[str, Any]]:
    return read_index_table(folder).to_pylist()


def read_rejected(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The rejected clips of committed parts."""
    folder = Path(folder)
    return _read_parts(folder / REJECTED_DIR, REJECTED_SCHEMA, committed_parts(folder)).to_pylist()


def has_index(folder: str | os.PathLike) -> bool:
    return (Path(folder) / INDEX_DIR).is_dir()


def committed_shards(folder: str | os.PathLike, split: str | None = None) -> list[str]:
    """The shards the index lists (paths, sorted as :func:`list_shards` sorts them).

    A folder without an index (shards made by hand) lists every complete shard in it.
    """
    if not has_index(folder):
        return list_shards(folder, split)
    listed = set(read_index_table(folder).column("shard").to_pylist())
    return [p for p in list_shards(folder, split) if Path(p).name in listed]


def remove_part(folder: str | os.PathLike, part: str) -> int:
    """Delete what an uncommitted part wrote (its shards, whole or partial, its rejections)."""
    folder = Path(folder)
    if part in committed_parts(folder):
        raise ValueError(f"part {part} is committed: its shards are part of the dataset")
    doomed = list_shards(folder, part=part)
    doomed += [str(p) for p in folder.glob(f".*-{part}-*{PARTIAL_SUFFIX}")]
    doomed.append(str(_part_path(folder, REJECTED_DIR, part)))
    removed = 0
    for path in doomed:
        if Path(path).exists():
            Path(path).unlink()
            removed += 1
    return removed


def clean_uncommitted(folder: str | os.PathLike) -> dict[str, int]:
    """Remove what a killed run left outside committed parts: partial shards, shards no index
    part lists, rejections of uncommitted parts and temporaries. Run it with no writer active
    (the pipeline holds the stage's lock)."""
    folder = Path(folder)
    removed = {"partial": len(clean_partial_shards(folder)), "unlisted": 0, "rejected": 0}
    listed = set(read_index_table(folder).column("shard").to_pylist())
    for path in list_shards(folder):
        if Path(path).name not in listed:
            Path(path).unlink()
            removed["unlisted"] += 1
    parts = committed_parts(folder)
    rejected = folder / REJECTED_DIR
    for path in rejected.glob("*.parquet") if rejected.is_dir() else []:
        if path.stem not in parts:
            path.unlink()
            removed["rejected"] += 1
    for kind in (INDEX_DIR, REJECTED_DIR):
        for tmp in (folder / kind).glob(".*.tmp") if (folder / kind).is_dir() else []:
            tmp.unlink()
    return removed


def write_part(
    folder: str | os.PathLike,
    part: str,
    results: Iterable[dict[str, list]],
    *,
    max_count: int,
    max_bytes: int,
    worker: str | None = None,
) -> dict[str, Any]:
    """Write one batch as part ``part``: stream the samples of ``results`` (per video:
    ``{"samples": [{"split", "sample"}, …], "rejected": [row, …]}``) into the part's shards,
    then commit. Anything this part wrote before (a failed try) goes first; on an error it goes
    again. A part already committed (a retry of a task whose first try finished) is not
    written again: its record is read back and ``results`` is not consumed.
    Returns the small record the driver keeps: counts, shard names, rejections."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if part in committed_parts(folder):
        return part_record(folder, part)
    remove_part(folder, part)
    rejected: list[dict[str, Any]] = []
    try:
        with ShardWriter(folder, max_count=max_count, max_bytes=max_bytes, part=part) as writer:
            for result in results:
                rejected.extend(result["rejected"])
                for s in result["samples"]:
                    writer.write(s["sample"], split=s["split"], worker=worker)
        commit_part(folder, part, writer.records, rejected)
    except BaseException:
        remove_part(folder, part)
        raise
    return _record(part, writer.records, rejected)


def _record(part: str, rows: Sequence[dict[str, Any]], rejected: list[dict]) -> dict[str, Any]:
    return {
        "part": part,
        "workers": sorted({r["worker"] for r in rows if r.get("worker")}),
        "samples": len(rows),
        "shards": sorted({r["shard"] for r in rows}),
        "splits": [r["split"] for r in rows],
        "rejected": rejected,
    }


def part_record(folder: str | os.PathLike, part: str) -> dict[str, Any]:
    """The record :func:`write_part` returned for a committed part, read back from disk."""
    folder = Path(folder)
    rows = _read_parts(folder / INDEX_DIR, INDEX_SCHEMA, {part}).to_pylist()
    rejected = _read_parts(folder / REJECTED_DIR, REJECTED_SCHEMA, {part}).to_pylist()
    return _record(part, rows, rejected)
