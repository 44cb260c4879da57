"""BrushData shards: the official tar layout, sample encode/decode with validation, an atomic shard writer,
a tar scanner giving each member's byte offsets, and the dataset index built from those offsets.

A shard is an uncompressed tar whose members are ``<key>.<suffix>``, grouped by key, in the official order
(official train_brushnet.py, MyWebDataset, reads these fields through webdataset):

- ``image``: JPEG bytes; ``caption``: UTF-8 text; ``height``/``width``: UTF-8 decimal, the stored JPEG's size;
- ``segmentation``: JSON ``{"mask": [RLE, ...]}``, BrushData RLEs (:func:`brushnet.masks.brushdata_rle_decode`);
- ``json``: our own metadata (JSON object or null), ignored by the official loader.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL.Image

from brushnet.atomic import atomic_write_text
from brushnet.masks import MaskError, brushdata_rle_check, brushdata_rle_decode

log = logging.getLogger(__name__)

MEMBER_ORDER = ("image", "caption", "height", "width", "segmentation", "json")
REQUIRED_MEMBERS = ("image", "caption", "height", "width", "segmentation")
INDEX_FORMAT = "brushdata-index"
INDEX_VERSION = 1
SAMPLES_PER_SHARD = 10_000  # the official BrushData shards hold 10,000 samples each

_BLOCK = 512
_EXIF_ORIENTATION = 0x0112


class BrushDataError(ValueError):
    """A bad shard or sample; the message names the shard, the sample key and what is wrong."""

    def __init__(self, shard: str | os.PathLike, key: str, reason: str) -> None:
        self.shard, self.key, self.reason = os.fspath(shard), str(key), reason
        super().__init__(f"{self.shard}: sample {self.key!r}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.shard, self.key, self.reason)


class DatasetIndexError(ValueError):
    """An index file that is missing fields, of another format or version, or otherwise unusable."""


# ----------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BrushDataSample:
    """One sample to write: JPEG bytes, caption, the JPEG's size and its object masks (BrushData RLEs)."""

    key: str
    image: bytes
    caption: str
    height: int
    width: int
    masks: list[list[int]]
    meta: dict | None = None


@dataclass
class DecodedSample:
    """A read and validated sample. ``image`` is uint8 HxWx3 RGB; masks stay RLE until :meth:`mask`."""

    key: str
    image: np.ndarray
    caption: str
    masks_rle: list[list[int]]
    height: int
    width: int
    meta: dict | None = None

    def mask(self, i: int) -> np.ndarray:
        """Object mask ``i`` as bool HxW (True = object)."""
        return brushdata_rle_decode(self.masks_rle[i], self.height, self.width)


def check_key(key: str, shard: str | os.PathLike = "?") -> None:
    """Raise BrushDataError unless ``key`` can name a sample (no dots: the first dot starts the suffix)."""
    if not isinstance(key, str) or not key:
        raise BrushDataError(shard, str(key), "sample keys must be non-empty strings")
    bad = [c for c in (".", "/", "\\", "\0") if c in key]
    if bad or key != key.strip():
        raise BrushDataError(shard, key, f"sample keys must not contain {bad or 'leading/trailing spaces'}")


def encode_sample(s: BrushDataSample, shard: str | os.PathLike = "?") -> dict[str, bytes]:
    """The tar members of a sample, in the official order. Checks the key, that ``height``/``width`` are
    the image's (read from its header) and that every RLE fits; raises BrushDataError naming the key."""
    check_key(s.key, shard)
    if not isinstance(s.image, (bytes, bytearray)) or not s.image:
        raise BrushDataError(shard, s.key, "image must be non-empty JPEG bytes")
    try:
        with PIL.Image.open(io.BytesIO(s.image)) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError) as e:
        raise BrushDataError(shard, s.key, f"image is not a readable image: {e}") from e
    if orientation not in (None, 1):
        # The official loader (cv2.imdecode, IMREAD_COLOR) would rotate such an image, so its masks and
        # height/width would no longer match the pixels.
        raise BrushDataError(
            shard,
            s.key,
            f"image has EXIF orientation {orientation}: apply it (PIL.ImageOps.exif_transpose) and re-encode",
        )
    if (h, w) != (s.height, s.width):
        raise BrushDataError(
            shard, s.key, f"height/width {s.height}x{s.width} differ from the image's {h}x{w}"
        )
    masks = []
    for i, rle in enumerate(s.masks):
        try:
            brushdata_rle_check(rle, h, w)
        except MaskError as e:
            raise BrushDataError(shard, s.key, f"mask {i}: {e}") from e
        masks.append([int(v) for v in rle])
    if s.meta is not None and not isinstance(s.meta, dict):
        raise BrushDataError(shard, s.key, f"meta must be a dict or None, got {type(s.meta).__name__}")
    try:
        meta = json.dumps(s.meta, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BrushDataError(shard, s.key, f"meta is not JSON-serialisable: {e}") from e
    return {
        "image": bytes(s.image),
        "caption": s.caption.encode("utf-8"),
        "height": str(int(s.height)).encode(),
        "width": str(int(s.width)).encode(),
        "segmentation": json.dumps({"mask": masks}, separators=(",", ":")).encode(),
        "json": meta.encode("utf-8"),
    }


def _positive_int(members: dict[str, bytes], name: str, shard: str, key: str) -> int:
    raw = members[name]
    try:
        value = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BrushDataError(shard, key, f"{name} is not a decimal integer: {raw[:32]!r}") from None
    if value < 1:
        raise BrushDataError(shard, key, f"{name} must be positive, got {value}")
    return value


def _json(members: dict[str, bytes], name: str, shard: str, key: str) -> Any:
    try:
        return json.loads(members[name])
    except (UnicodeDecodeError, ValueError) as e:
        raise BrushDataError(shard, key, f"{name} is not valid JSON: {e}") from None


def decode_sample(members: dict[str, bytes], *, key: str, shard: str | os.PathLike = "?") -> DecodedSample:
    """Decode and validate a sample's members: all required members present, UTF-8 caption, integer
    height/width equal to the decoded image's size, segmentation JSON ``{"mask": [...]}`` with every RLE
    within bounds (checked now, decoded later by :meth:`DecodedSample.mask`). Raises BrushDataError."""
    shard = os.fspath(shard)
    missing = [m for m in REQUIRED_MEMBERS if m not in members]
    if missing:
        raise BrushDataError(shard, key, f"missing member(s) {missing} (has {sorted(members)})")
    try:
        caption = members["caption"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise BrushDataError(shard, key, f"caption is not valid UTF-8: {e}") from None
    height = _positive_int(members, "height", shard, key)
    width = _positive_int(members, "width", shard, key)
    # The stored pixel grid, as height/width and the RLEs describe it (cv2 would otherwise apply an EXIF
    # rotation; our writer refuses such images).
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = cv2.imdecode(np.frombuffer(members["image"], dtype=np.uint8), flags)
    except cv2.error:  # e.g. an empty buffer
        bgr = None
    if bgr is None:
        raise BrushDataError(shard, key, f"image ({len(members['image'])} bytes) could not be decoded")
    if bgr.shape[:2] != (height, width):
        raise BrushDataError(
            shard,
            key,
            f"height/width say {height}x{width} but the image decodes to {bgr.shape[0]}x{bgr.shape[1]}",
        )
    segmentation = _json(members, "segmentation", shard, key)
    if not isinstance(segmentation, dict) or not isinstance(segmentation.get("mask"), list):
        raise BrushDataError(shard, key, 'segmentation must be a JSON object {"mask": [RLE, ...]}')
    masks = segmentation["mask"]
    for i, rle in enumerate(masks):
        if not isinstance(rle, list):
            raise BrushDataError(shard, key, f"segmentation mask {i} is not a list: {type(rle).__name__}")
        try:
            brushdata_rle_check(rle, height, width)
        except MaskError as e:
            raise BrushDataError(shard, key, f"segmentation mask {i}: {e}") from None
    meta = _json(members, "json", shard, key) if "json" in members else None
    if meta is not None and not isinstance(meta, dict):
        raise BrushDataError(shard, key, f"json must be an object or null, got {type(meta).__name__}")
    return DecodedSample(
        key=key,
        image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB),
        caption=caption,
        masks_rle=masks,
        height=height,
        width=width,
        meta=meta,
    )


# ----------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------------------


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
