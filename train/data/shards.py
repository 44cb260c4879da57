"""Where the training samples live: shard sources (paths, globs, brace ranges, ``pipe:`` URLs) and the
per-sample byte-offset table the indexed loader seeks into."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from braceexpand import braceexpand

from brushnet.atomic import atomic_write_text
from brushnet.brushdata import BrushDataError, SampleRecord, load_index, scan_shard, write_index

log = logging.getLogger(__name__)

# The official BrushData members read by the loader (train_brushnet.py); our own `<key>.json` is ignored.
MEMBERS = ("image", "caption", "height", "width", "segmentation")
_GLOB_CHARS = set("*?[")
# A sample whose members are spread further than this inside the tar is read member by member.
_MAX_SPAN = 64 << 20


def expand_sources(sources: str | list[str]) -> list[str]:
    """Brace ranges, globs and folders (all ``*.tar`` inside) to a de-duplicated, ordered list of shards.

    ``pipe:`` URLs and other URLs are brace-expanded only. A local entry that matches nothing is an error."""
    entries = [sources] if isinstance(sources, str) else list(sources)
    out: list[str] = []
    for entry in entries:
        for item in braceexpand(str(entry)):
            if "://" in item or item.startswith("pipe:"):
                out.append(item)
            elif Path(item).is_dir():
                found = sorted(str(p) for p in Path(item).glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"shard folder {item} holds no *.tar files")
                out.extend(found)
            elif _GLOB_CHARS & set(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise FileNotFoundError(f"shard pattern {item!r} matches no file")
                out.extend(found)
            elif Path(item).is_file():
                out.append(item)
            else:
                raise FileNotFoundError(f"shard {item} does not exist")
    if not out:
        raise ValueError(f"no shards given (train_shards={sources!r})")
    return list(dict.fromkeys(out))


def is_local(source: str) -> bool:
    return not (source.startswith("pipe:") or "://" in source)


@dataclass
class DamagedShard:
    """A truncated, empty or corrupt shard found while scanning: the intact samples before the damage are
    kept (``kept``), ``lost`` counts the samples it cut off (at least 1: what the missing tail held is unknown)."""

    path: str
    reason: str
    lost: int
    kept: list[dict] = field(default_factory=list)  # [{"key", "members": {suffix: [offset, size]}}]


def salvage_shard(path: str | os.PathLike, reason: str) -> DamagedShard:
    """The samples of a damaged tar that can still be read: every member needed by the loader present and
    its data inside the file. Read with ``tarfile``, which stops at the first unreadable header."""
    size = os.path.getsize(path)
    samples: dict[str, dict[str, list[int]]] = {}
    cut: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, EOFError, OSError):
                    break
                if info is None:
                    break
                folder, _, base = info.name.rpartition("/")
                stem, dot, suffix = base.partition(".")  # webdataset's key rule, as brushdata.scan_shard
                if not info.isfile() or not dot or not stem:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                members = samples.setdefault(key, {})
                if info.offset_data + info.size > size:
                    cut.add(key)
                    break
                members[suffix] = [info.offset_data, info.size]
    except (tarfile.TarError, EOFError, OSError):  # empty, or unreadable from the first header on
        pass
    kept = [{"key": k, "members": m} for k, m in samples.items() if k not in cut and set(MEMBERS) <= set(m)]
    return DamagedShard(str(path), reason, max(len(samples) - len(kept), 1), kept)


def damaged_report_path(index_path: str | os.PathLike) -> Path:
    """Where :func:`ensure_index` records (JSON) the damaged shards of a scanned index: next to it, with the
    suffix ``.damaged`` instead of ``.json`` (so a glob for index files does not match it)."""
    return Path(index_path).with_suffix(".damaged")


@dataclass
class SampleTable:
    """Compact (numpy, fork-friendly) table of every sample: its shard and each member's byte range."""

    shard_paths: list[str]
    shard_of: np.ndarray  # int32 [n]
    keys: np.ndarray  # bytes [n]
    spans: np.ndarray  # int64 [n, len(MEMBERS), 2]: (offset, size) of each member's data; -1 if absent
    damaged: list[DamagedShard] = field(default_factory=list)

    @property
    def lost_samples(self) -> int:
        """Samples cut off in damaged shards (counted once, at scan time; see :class:`DamagedShard`)."""
        return sum(d.lost for d in self.damaged)

    def __len__(self) -> int:
        return len(self.shard_of)

    def shard(self, i: int) -> str:
        return self.shard_paths[int(self.shard_of[i])]

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8", "replace")

    def shard_counts(self) -> list[int]:
        return np.bincount(self.shard_of, minlength=len(self.shard_paths)).tolist()

    @classmethod
    def from_index(cls, index_path: str | os.PathLike, only: list[str] | None = None) -> SampleTable:
        """Table of an index JSON written by the data pipeline (``brushnet.brushdata.write_index``).

        ``only``: restrict to these shard files (each must be in the index)."""
        index = load_index(index_path)
        paths, shard_of, keys, spans = [], [], [], []
        wanted = None if only is None else {os.path.realpath(p) for p in only}
        report = damaged_report_path(index_path)
        damaged = []
        if report.is_file():  # written by ensure_index: shards that were truncated or empty when scanned
            damaged = [DamagedShard(**d) for d in json.loads(report.read_text())["damaged"]]
        shards = [(str(s.file), s.samples) for s in index.shards]
        for d in damaged:
            log.warning(
                "damaged shard %s (%s): training on its %d intact samples, %d lost (counted as bad samples)",
                d.path,
                d.reason,
                len(d.kept),
                d.lost,
            )
            shards.append((d.path, [SampleRecord(r["key"], r["members"]) for r in d.kept]))
        for path, records in shards:
            if wanted is not None and os.path.realpath(path) not in wanted:
                continue
            sid = len(paths)
            paths.append(path)
            for record in records:
                shard_of.append(sid)
                keys.append(record.key.encode("utf-8"))
                spans.append([tuple(record.members.get(m, (-1, -1))) for m in MEMBERS])
        if wanted is not None:
            missing = wanted - {os.path.realpath(p) for p in paths}
            if missing:
                raise ValueError(f"{index_path}: these shards are not in the index: {sorted(missing)}")
        if not shard_of:
            raise ValueError(f"{index_path}: the index lists no samples")
        return cls(
            paths,
            np.asarray(shard_of, dtype=np.int32),
            np.asarray(keys, dtype=bytes),
            np.asarray(spans, dtype=np.int64).reshape(-1, len(MEMBERS), 2),
            [d for d in damaged if wanted is None or os.path.realpath(d.path) in wanted],
        )

    def read_members(self, i: int, fds: dict[str, int]) -> dict[str, bytes]:
        """The sample's member bytes via ``os.pread`` (no shared file offset: safe across forked workers).

        Raises BrushDataError if the shard is shorter than the index says (truncated tar)."""
        path, key = self.shard(i), self.key(i)
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        present = [(m, int(off), int(size)) for m, (off, size) in zip(MEMBERS, self.spans[i]) if off >= 0]
        if not present:
            return {}
        lo = min(off for _, off, _ in present)
        hi = max(off + size for _, off, size in present)
        if hi - lo <= _MAX_SPAN:
            blob = os.pread(fd, hi - lo, lo)
            if len(blob) != hi - lo:
                raise BrushDataError(path, key, f"truncated tar: wanted bytes {lo}..{hi}, file ends earlier")
            return {m: blob[off - lo : off - lo + size] for m, off, size in present}
        out = {}
        for m, off, size in present:
            out[m] = os.pread(fd, size, off)
            if len(out[m]) != size:
                raise BrushDataError(path, key, f"truncated tar: member {m!r} wanted {size} bytes at {off}")
        return out


def _cache_key(shards: list[str]) -> str:
    h = hashlib.sha256()
    for s in shards:
        st = os.stat(s)
        h.update(f"{os.path.realpath(s)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_index_path(shards: list[str], cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the scanned index of these local shards is cached: ``<cache_dir>`` if given, else next to the
    first shard if that folder is writable, else ``~/.cache/brushnet/index``. The name hashes the shards'
    paths, sizes and mtimes, so a changed shard gets a new scan."""
    name = f".brushdata-index-{_cache_key(shards)}.json"
    if cache_dir is not None:
        return Path(cache_dir) / name
    folder = Path(shards[0]).resolve().parent
    if os.access(folder, os.W_OK):
        return folder / name
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "brushnet" / "index" / name


def ensure_index(shards: list[str], cache_dir: str | os.PathLike | None = None) -> Path:
    """Scan the local shards once (``write_index``, atomic) unless a cached index for them exists."""
    non_local = [s for s in shards if not is_local(s)]
    if non_local:
        raise ValueError(
            f"indexed mode needs local shard files (or an `index`); got URLs such as {non_local[0]!r}: "
            "use mode='stream' for pipe:/http sources"
        )
    path = cached_index_path(shards, cache_dir)
    if path.is_file() and damaged_report_path(path).is_file():
        try:
            json.loads(path.read_text())
            return path
        except (OSError, ValueError):
            log.warning("cached index %s is unreadable; scanning the shards again", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("scanning %d shards for their sample offsets (once; cached at %s)", len(shards), path)
    readable, damaged = [], []
    for shard in shards:
        try:
            scan_shard(shard)  # headers only; write_index scans again while hashing the data
            readable.append(Path(shard).resolve())
        except BrushDataError as e:  # truncated/empty/corrupt tar: its intact samples and the others
            damaged.append(salvage_shard(Path(shard).resolve(), e.reason))
    if not readable and not any(d.kept for d in damaged):
        raise BrushDataError(shards[0], "?", f"none of the {len(shards)} shards could be read (see the log)")
    # the report first: an index without a report next to it means no damaged shards
    atomic_write_text(damaged_report_path(path), json.dumps({"damaged": [asdict(d) for d in damaged]}))
    write_index(readable, path, root=path.parent)
    return path
