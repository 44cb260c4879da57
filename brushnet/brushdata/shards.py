"""BrushData shards: an atomic, deterministic tar writer and a tar scanner that gives each member's byte
offset, so a sample can be read back with one seek (:func:`read_sample`)."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from brushnet.brushdata.samples import BrushDataError, BrushDataSample, encode_sample

_BLOCK = 512  # tar block size


class ShardWriter:
    """Write ``<directory>/<name>.tar`` atomically: members go to ``<name>.tar.tmp-<pid>``, which is renamed
    when the ``with`` block ends normally and removed when it raises. Output is deterministic (fixed mtime,
    owner and mode), so the same samples give the same bytes."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"shard name must be a plain file name without folders, got {name!r}")
        name = name.removesuffix(".tar")
        self.path = Path(directory) / f"{name}.tar"
        self.tmp_path = Path(directory) / f"{name}.tar.tmp-{os.getpid()}"
        self.count = 0
        self._keys: set[str] = set()
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        return self

    def write(self, sample: BrushDataSample) -> None:
        if self._tar is None:
            raise RuntimeError("ShardWriter.write outside its `with` block")
        if sample.key in self._keys:
            raise BrushDataError(self.path, sample.key, "duplicate key in this shard")
        for suffix, data in encode_sample(sample, self.path).items():
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(sample.key)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tar is not None and self._file is not None
        complete = False
        try:
            if exc_type is None:
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
                complete = True
        finally:
            self._file.close()
            self._tar = self._file = None
            if complete:
                os.replace(self.tmp_path, self.path)
            else:
                self.tmp_path.unlink(missing_ok=True)


@dataclass
class SampleRecord:
    """A sample in a shard: its key and, per member suffix, ``(offset, size)`` of the member's data."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError(f"bad pax record length {length}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    return f"{prefix}/{name}" if header[257:262] == b"ustar" and prefix else name


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name, the suffix the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix


def scan_shard(path: str | os.PathLike) -> list[SampleRecord]:
    """Every sample of a shard with the byte offset and size of each member's data inside the (uncompressed)
    tar, read from the headers only. A truncated or corrupt tar raises BrushDataError naming the shard and
    the last complete sample; members with a repeated key or suffix raise too."""
    path = os.fspath(path)
    records: list[SampleRecord] = []
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, kind in (
        (b"\x1f\x8b", "gzip"),
        (b"BZh", "bzip2"),
        (b"\xfd7zXZ", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
    ):
        if magic.startswith(prefix):
            raise BrushDataError(
                path,
                "?",
                f"shard is {kind}-compressed: byte offsets need an uncompressed tar (decompress it)",
            )

    def fail(key: str, reason: str) -> BrushDataError:
        # A sample is known complete once a member of another key follows it; `key` is "?" when the
        # failing header could not be read, in which case the sample being read may be incomplete.
        done = current is not None and key not in ("?", current.key)
        last = current.key if done else (records[-1].key if records else None)
        where = f"last complete sample: {last!r}" if last else "no complete sample before it"
        if current is not None and not done and key == "?":
            where += f"; the last member read belongs to {current.key!r}"
        return BrushDataError(path, key, f"{reason} ({where})")

    current: SampleRecord | None = None
    seen: set[str] = set()
    pending: dict[str, str] = {}  # pax / GNU long-name overrides for the next member
    with open(path, "rb") as f:
        offset = 0
        while True:
            header = f.read(_BLOCK)
            if len(header) < _BLOCK:
                raise fail(
                    "?",
                    f"truncated tar: ends inside or before a header at byte {offset} (no end-of-archive marker)",
                )
            if header == b"\0" * _BLOCK:
                break
            try:
                checksum_ok = _octal(header[148:156]) == sum(header[:148]) + 8 * 32 + sum(header[156:])
                size = _octal(header[124:136])
                kind = header[156:157]
                extended = kind in (b"x", b"L", b"g")
                if not extended and "size" in pending:
                    size = int(pending["size"])
            except ValueError:
                checksum_ok = False
            if not checksum_ok:
                raise fail("?", f"corrupt tar header at byte {offset} (bad checksum or number field)")
            data_offset = offset + _BLOCK
            offset = data_offset + -(-size // _BLOCK) * _BLOCK
            if data_offset + size > file_size:
                name = pending.get("path") or _header_name(header)
                split = _split_name(name)
                raise fail(
                    split[0] if split else name,
                    f"truncated tar: member {name!r} needs bytes {data_offset}..{data_offset + size} but the "
                    f"file has {file_size}",
                )
            if extended:
                payload = f.read(size)
                f.seek(offset)
                if kind == b"x":
                    try:
                        pending.update(_pax_records(payload))
                    except ValueError:
                        raise fail("?", f"corrupt pax header at byte {data_offset - _BLOCK}") from None
                elif kind == b"L":
                    pending["path"] = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            f.seek(offset)
            name = pending.pop("path", None)
            pending.clear()
            if kind not in (b"0", b"\0", b"7"):  # folders, links and the like hold no member
                continue
            split = _split_name(name if name is not None else _header_name(header))
            if split is None:
                continue
            key, suffix = split
            if current is None or key != current.key:
                if key in seen:
                    raise fail(key, f"key {key!r} appears again after other samples")
                if current is not None:
                    records.append(current)
                current = SampleRecord(key)
                seen.add(key)
            if suffix in current.members:
                raise fail(key, f"member {key}.{suffix} appears twice")
            current.members[suffix] = (data_offset, size)
    if current is not None:
        records.append(current)
    return records


def read_sample(path: str | os.PathLike, record: SampleRecord) -> dict[str, bytes]:
    """The member bytes of a scanned sample (seek + read; BrushDataError if the shard is now shorter)."""
    out = {}
    with open(path, "rb") as f:
        for suffix, (off, size) in record.members.items():
            f.seek(off)
            data = f.read(size)
            if len(data) != size:
                raise BrushDataError(
                    path, record.key, f"truncated tar: member {suffix!r} wants {size} bytes at {off}"
                )
            out[suffix] = data
    return out
