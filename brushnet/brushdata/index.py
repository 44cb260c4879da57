"""The BrushData dataset index: per shard its sample count, size, sha256 and every sample's member byte
offsets (from :func:`brushnet.brushdata.shards.scan_shard`). The trainer's map-style dataset reads it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brushnet.atomic import atomic_write_text
from brushnet.brushdata.samples import BrushDataError
from brushnet.brushdata.shards import SampleRecord, scan_shard
from brushnet.errors import BrushNetError

log = logging.getLogger(__name__)

INDEX_FORMAT = "brushdata-index"
INDEX_VERSION = 1


class DatasetIndexError(BrushNetError, ValueError):
    """An index file that is missing fields, of another format or version, or otherwise unusable."""


@dataclass
class ShardEntry:
    """A shard in the index. ``path`` as stored (relative to the index's folder, or absolute); ``file`` the
    resolved path."""

    path: str
    file: Path
    num_samples: int
    bytes: int
    sha256: str
    samples: list[SampleRecord]


@dataclass
class DatasetIndex:
    path: Path
    shards: list[ShardEntry]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_index(
    shards: Iterable[str | os.PathLike], index_path: str | os.PathLike, root: str | os.PathLike | None = None
) -> DatasetIndex:
    """Scan ``shards`` and write the index JSON atomically. Shards inside ``root`` (default: the index's
    folder) are stored relative to the index's folder, so the dataset folder can move as a whole; others
    are stored as absolute paths."""
    index_path = Path(index_path).absolute()
    base = index_path.parent
    root_dir = Path(root).absolute() if root is not None else base
    entries, payload = [], []
    for shard in shards:
        file = Path(shard).absolute()
        records = scan_shard(file)
        inside = os.path.commonpath([file, root_dir]) == str(root_dir)
        stored = os.path.relpath(file, base) if inside else str(file)
        entry = ShardEntry(stored, file, len(records), file.stat().st_size, _sha256(file), records)
        entries.append(entry)
        payload.append(
            {
                "path": entry.path,
                "num_samples": entry.num_samples,
                "bytes": entry.bytes,
                "sha256": entry.sha256,
                "samples": [
                    {"key": r.key, "members": {k: list(v) for k, v in r.members.items()}} for r in records
                ],
            }
        )
    doc = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "shards": payload}
    atomic_write_text(index_path, json.dumps(doc, separators=(",", ":")))
    return DatasetIndex(index_path, entries)


def _span(value: Any) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ValueError(f"member span must be [offset, size] of non-negative integers, got {value!r}")
    return value[0], value[1]


def load_index(index_path: str | os.PathLike) -> DatasetIndex:
    """Read an index written by :func:`write_index`, checking its format, version and structure, and that
    every shard it lists exists (FileNotFoundError naming it). A shard whose size differs from the index's
    is logged (it changed after indexing; bad samples will surface when read)."""
    index_path = Path(index_path).absolute()
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"index file {str(index_path)!r} does not exist") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetIndexError(f"{index_path}: not a JSON index file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise DatasetIndexError(f"{index_path}: format is {got!r}, expected {INDEX_FORMAT!r}")
    if doc.get("version") != INDEX_VERSION:
        raise DatasetIndexError(
            f"{index_path}: index version {doc.get('version')!r} is not supported (this code reads version "
            f"{INDEX_VERSION}); rebuild the index with this version's write_index"
        )
    if not isinstance(doc.get("shards"), list):
        raise DatasetIndexError(f"{index_path}: 'shards' must be a list")
    entries = []
    for i, shard in enumerate(doc["shards"]):
        try:
            stored = shard["path"]
            if not isinstance(stored, str) or not stored:
                raise ValueError(f"path must be a non-empty string, got {stored!r}")
            samples = [
                SampleRecord(str(s["key"]), {str(k): _span(v) for k, v in s["members"].items()})
                for s in shard["samples"]
            ]
            entry = ShardEntry(
                stored,
                Path(stored) if Path(stored).is_absolute() else index_path.parent / stored,
                int(shard["num_samples"]),
                int(shard["bytes"]),
                str(shard["sha256"]),
                samples,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DatasetIndexError(
                f"{index_path}: shard entry {i} is malformed: {type(e).__name__}: {e}"
            ) from None
        if entry.num_samples != len(samples):
            raise DatasetIndexError(
                f"{index_path}: shard {stored!r} says num_samples={entry.num_samples} but lists {len(samples)}"
            )
        if not entry.file.is_file():
            raise FileNotFoundError(
                f"{index_path}: shard {stored!r} listed in the index does not exist (looked for {entry.file})"
            )
        size = entry.file.stat().st_size
        if size != entry.bytes:
            log.warning(
                "%s: shard %s is %d bytes but the index says %d: it changed after indexing",
                index_path,
                stored,
                size,
                entry.bytes,
            )
        entries.append(entry)
    return DatasetIndex(index_path, entries)


def verify_index(index: DatasetIndex) -> None:
    """Check every shard's size and sha256 against the index (reads all the data); raises BrushDataError."""
    for entry in index.shards:
        size = entry.file.stat().st_size
        if size != entry.bytes:
            raise BrushDataError(
                entry.file, "?", f"shard is {size} bytes, the index {index.path} says {entry.bytes}"
            )
        digest = _sha256(entry.file)
        if digest != entry.sha256:
            raise BrushDataError(entry.file, "?", f"sha256 {digest} differs from the index's {entry.sha256}")
