"""BrushData shards: an atomic, deterministic tar writer and a tar scanner that gives each member's byte
offset, so a sample can be read back with one seek (:func:`read_sample`)."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from brushnet.brushdata.samples import BrushDataError, BrushDataSample, encode_sample


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


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_EXTENDED = {
    tarfile.XHDTYPE: "pax",
    tarfile.XGLTYPE: "pax",
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-name",
}


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name, the suffix the rest."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix


def _truncated_member(name: str, data_offset: int, size: int, file_size: int) -> str:
    return (
        f"truncated tar: member {name!r} needs bytes {data_offset}..{data_offset + size} but the file has "
        f"{file_size}"
    )


def _stop_reason(f: BinaryIO, offset: int, file_size: int) -> tuple[str, str] | None:
    """Why tarfile stopped at the header at ``offset`` (after the first header it ends quietly on a bad one):
    None at the end-of-archive block, else ``(key, reason)``. Extended headers (pax, GNU long name) are
    followed to the header they describe, so the reason names the block that is actually broken."""
    start, refused = offset, "tar"
    while True:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE:
            return "?", (
                f"truncated tar: ends inside or before a header at byte {offset} (no end-of-archive marker)"
            )
        if block == tarfile.NUL * tarfile.BLOCKSIZE:
            if offset == start:
                return None
            break  # extended header(s) that describe no member
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            return "?", f"corrupt tar header at byte {offset} (bad checksum or number field)"
        data_offset = offset + tarfile.BLOCKSIZE
        if data_offset + info.size > file_size:
            split = _split_name(info.name)
            reason = _truncated_member(info.name, data_offset, info.size, file_size)
            return (split[0] if split else info.name), reason
        if info.type not in _EXTENDED:
            break  # a sound member header: what tarfile refused is the extended header at `start`
        if offset == start:
            refused = _EXTENDED[info.type]
        offset = data_offset + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return "?", f"corrupt {refused} header at byte {start}"


def scan_shard(path: str | os.PathLike) -> list[SampleRecord]:
    """Every sample of a shard with the byte offset and size of each member's data inside the (uncompressed)
    tar (tarfile's ``offset_data``; headers only). A truncated or corrupt tar raises BrushDataError naming the
    shard and the last complete sample; members with a repeated key or suffix raise too."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    records: list[SampleRecord] = []
    current: SampleRecord | None = None
    seen: set[str] = set()

    def fail(key: str, reason: str) -> BrushDataError:
        # A sample is known complete once a member of another key follows it; `key` is "?" when the
        # failing header could not be read, in which case the sample being read may be incomplete.
        done = current is not None and key not in ("?", current.key)
        last = current.key if done else (records[-1].key if records else None)
        where = f"last complete sample: {last!r}" if last else "no complete sample before it"
        if current is not None and not done and key == "?":
            where += f"; the last member read belongs to {current.key!r}"
        return BrushDataError(path, key, f"{reason} ({where})")

    # tarfile reads pax paths and GNU long names; wids' tar index (webdataset) skips them, so keys would differ.
    with open(path, "rb") as f:
        try:
            tar = tarfile.TarFile(fileobj=f, encoding="utf-8", errors="surrogateescape")  # uncompressed
        except tarfile.ReadError:  # the first header is unreadable
            f.seek(0)
            magic = f.read(6)
            for prefix, kind in _COMPRESSED.items():
                if magic.startswith(prefix):
                    reason = (
                        f"shard is {kind}-compressed: byte offsets need an uncompressed tar (decompress it)"
                    )
                    raise BrushDataError(path, "?", reason) from None
            raise fail(*(_stop_reason(f, 0, file_size) or ("?", "not a tar file"))) from None
        while True:
            try:
                member = tar.next()
            except tarfile.ReadError as e:  # a broken extended header; tar.offset is still its start
                raise fail(*(_stop_reason(f, tar.offset, file_size) or ("?", str(e)))) from None
            if member is None:
                stop = _stop_reason(f, tar.offset, file_size)
                if stop is not None:
                    raise fail(*stop)
                break
            if member.offset_data + member.size > file_size:
                split = _split_name(member.name)
                raise fail(
                    split[0] if split else member.name,
                    _truncated_member(member.name, member.offset_data, member.size, file_size),
                )
            tar.members.clear()  # tarfile keeps every TarInfo it reads; the records are all we need
            split = _split_name(member.name) if member.isreg() else None  # folders, links: no member
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
            current.members[suffix] = (member.offset_data, member.size)
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
