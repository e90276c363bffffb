"""WebDataset shards: split assignment and a crash-safe appending writer.

Layout of an output folder::

    train-000000.tar  train-000001.tar  val-000000.tar
    train-p1a2b3c4d5e-000000.tar       ← a shard of part ``p1a2b3c4d5e`` (one worker's batch)
    .train-000002.tar.partial      ← a shard being written (or left by a killed run)

A shard is written under a hidden ``.partial`` name and renamed only once complete, so a
reader globbing ``*.tar`` (or :func:`list_shards`) never sees half a shard. A later run starts
at :func:`next_shard_index` and so adds shards after the existing ones without touching them.
One writer per (folder, split, part) at a time: two concurrent writers of the same part would
pick the same index, so concurrent workers each write a part of their own (the pipeline's
index over the parts is :mod:`preprocessing.shard_index`). Tar members get mtime 0 and fixed
owners, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Literal

import webdataset as wds

SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9]+)-(?:(?P<part>[a-z0-9]+)-)?(?P<index>\d{6})\.tar$")
PART_RE = re.compile(r"[a-z0-9]+")
PARTIAL_SUFFIX = ".partial"
_KEY_RE = re.compile(r"^(?P<video_id>.+)_(?P<clip_index>\d{4,})$")
_BLOCK = tarfile.BLOCKSIZE  # 512: header and data padding unit
_RECORD = tarfile.RECORDSIZE  # 10240: the archive is padded to this on close

def assign_split(video_id: str, val_fraction: float, seed: int = 0) -> Literal["train", "val"]:
    """'val' for about ``val_fraction`` of video ids, fixed per (id, seed).

    Split by source video so no identity's clips land in both splits.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    digest = hashlib.sha256(f"{seed}:{video_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "val" if u < val_fraction else "train"


def shard_name(split: str, index: int, part: str | None = None) -> str:
    return f"{split}-{part}-{index:06d}.tar" if part else f"{split}-{index:06d}.tar"


def list_shards(
    out_dir: str | os.PathLike, split: str | None = None, part: str | None = None
) -> list[str]:
    """Complete shards (paths as strings, sorted by split, part, index); never partial files.
    ``part`` given: only that part's shards."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = SHARD_RE.match(p.name)
        if (m and p.is_file() and (split is None or m["split"] == split)
                and (part is None or m["part"] == part)):
            found.append((m["split"], m["part"] or "", int(m["index"]), str(p)))
    return [path for *_, path in sorted(found)]


def next_shard_index(out_dir: str | os.PathLike, split: str, part: str | None = None) -> int:
    """One past the highest complete shard index of (``split``, ``part``) (0 when none)."""
    indices = [int(m["index"]) for p in list_shards(out_dir, split)
               if (m := SHARD_RE.match(Path(p).name))["part"] == part]
    return max(indices) + 1 if indices else 0


def clean_partial_shards(out_dir: str | os.PathLike) -> list[str]:
    """Remove ``.partial`` shards left by a killed run; returns what was removed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    for p in sorted(out_dir.iterdir()):
        if p.name.startswith(".") and p.name.endswith(PARTIAL_SUFFIX) and p.is_file():
            p.unlink()
            removed.append(str(p))
    return removed


def _member_bytes(n: int) -> int:
    return _BLOCK + math.ceil(n / _BLOCK) * _BLOCK


def _archive_bytes(members: int) -> int:
    """Size on disk of a closed tar whose members take ``members`` bytes (end blocks, record)."""
    return math.ceil((members + 2 * _BLOCK) / _RECORD) * _RECORD


class _OpenShard:
    def __init__(self, out_dir: Path, split: str, index: int, part: str | None) -> None:
        self.name = shard_name(split, index, part)
        self.final = out_dir / self.name
        self.tmp = out_dir / f".{self.name}{PARTIAL_SUFFIX}"
        self.file = open(self.tmp, "wb")
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=0)
        # An int mtime and short ASCII names keep every member to one 512-byte header (a float
        # mtime or a long/non-ASCII name adds PAX headers), so sizes can be predicted exactly.
        self.count = 0
        self.members = 0  # bytes of headers + padded data written so far


class ShardWriter:
    """Write samples into ``{split}-{index:06d}.tar`` shards under ``out_dir``.

    A shard rolls over before it would hold more than ``max_count`` samples or grow past
    ``max_bytes`` on disk (a single sample bigger than that gets a shard of its own). Samples
    are WebDataset dicts of bytes (``encode_clip``'s output). Use as a context manager: on a
    clean exit every open shard is renamed into place; on an exception the open shards are
    deleted and their samples dropped from :attr:`records` (finished shards stay).
    ``part`` (lower-case alphanumeric) names the shards ``{split}-{part}-{index:06d}.tar``,
    so writers of different parts can share a folder.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str = "train",
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
        part: str | None = None,
    ) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be positive")
        if part is not None and not PART_RE.fullmatch(part):
            raise ValueError(f"part names are lower-case alphanumeric, got {part!r}")
        self.part = part
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.records: list[dict[str, Any]] = []
        self.shards: list[str] = []  # finished shard paths, in order
        self._open: dict[str, _OpenShard] = {}
        self._next: dict[str, int] = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: dict[str, Any], split: str | None = None, **extra: Any) -> str:
        """Add ``sample`` to the current shard of ``split`` (default: the writer's split).

        Returns the file name of the (final) shard it lands in. The record kept for it holds
        ``key``, ``split``, ``shard``, ``video_id`` and ``clip_index`` (parsed from a
        ``<video_id>_<clip_index>`` key), ``num_frames`` (from the sample's ``json``), then
        ``extra``, which overrides any of those.
        """
        split = split or self.split
        if not re.fullmatch(r"[A-Za-z0-9]+", split):
            raise ValueError(f"split names are alphanumeric, got {split!r}")
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key or not key.isascii():
            raise ValueError(f"sample needs an ASCII __key__ without dots, got {key!r}")
        size = 0
        for name, value in sample.items():
            if name.startswith("_"):
                continue
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"{key}.{name} must be bytes, got {type(value).__name__}")
            if len(f"{key}.{name}") > 100 or not name.isascii():  # one USTAR header's limit
                raise ValueError(f"member name too long or not ASCII: {key}.{name}")
            size += _member_bytes(memoryview(value).nbytes)

        shard = self._open.get(split)
        if shard is not None and (
            shard.count >= self.max_count or _archive_bytes(shard.members + size) > self.max_bytes
        ):
            self._finish(split)
            shard = None
        if shard is None:
            if split not in self._next:
                self._next[split] = next_shard_index(self.out_dir, split, self.part)
            shard = _OpenShard(self.out_dir, split, self._next[split], self.part)
            self._next[split] += 1
            self._open[split] = shard
        shard.writer.write(sample)
        shard.count += 1
        shard.members = shard.writer.tarstream.offset  # bytes written, as tarfile counts them

        record: dict[str, Any] = {"key": key, "split": split, "shard": shard.name}
        m = _KEY_RE.match(key)
        record["video_id"] = m["video_id"] if m else None
        record["clip_index"] = int(m["clip_index"]) if m else None
        record["num_frames"] = _num_frames(sample)
        record.update(extra)
        self.records.append(record)
        return shard.name

    def _finish(self, split: str) -> None:
        shard = self._open.pop(split)
        shard.writer.close()
        shard.file.flush()
        os.fsync(shard.file.fileno())
        shard.file.close()
        if shard.final.exists():  # never clobber a shard another run wrote meanwhile
            shard.tmp.unlink(missing_ok=True)
            raise FileExistsError(f"{shard.final} appeared while writing it")
        os.replace(shard.tmp, shard.final)
        self.shards.append(str(shard.final))

    def close(self) -> None:
        """Finish every open shard (rename into place)."""
        for split in list(self._open):
            self._finish(split)

    def abort(self) -> None:
        """Delete the open (unfinished) shards and forget their records."""
        dropped = set()
        for split in list(self._open):
            shard = self._open.pop(split)
            try:
                shard.writer.close()
            finally:
                shard.file.close()
                shard.tmp.unlink(missing_ok=True)
            dropped.add(shard.name)
        self.records = [r for r in self.records if r["shard"] not in dropped]


def _num_frames(sample: dict[str, Any]) -> int | None:
    meta = sample.get("json")
    if meta is None:
        return None
    try:
        value = json.loads(meta).get("num_frames")
    except (ValueError, AttributeError, TypeError):
        return None
    return int(value) if isinstance(value, int | float) else None
