"""BrushData samples: the official member layout, encoding with validation, and decoding that checks every
field (a bad sample raises :class:`BrushDataError` naming the shard, the key and what is wrong)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import PIL.Image

from brushnet.errors import BrushNetError
from brushnet.masks import MaskError, brushdata_rle_check, brushdata_rle_decode

# The official member order and fields (official train_brushnet.py, MyWebDataset); ``json`` is our own.
MEMBER_ORDER = ("image", "caption", "height", "width", "segmentation", "json")
REQUIRED_MEMBERS = ("image", "caption", "height", "width", "segmentation")

_EXIF_ORIENTATION = 0x0112
# cv2.IMREAD_REDUCED_COLOR_{2,4,8} = IMREAD_COLOR | 16, 32, 64: only scale bits, ORed with the flags used
_REDUCED_FLAGS = {1: 0, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
_REDUCED_FLAGS[8] = cv2.IMREAD_REDUCED_COLOR_8


class BrushDataError(BrushNetError, ValueError):
    """A bad shard or sample; the message names the shard, the sample key and what is wrong."""

    def __init__(self, shard: str | os.PathLike, key: str, reason: str) -> None:
        self.shard, self.key, self.reason = os.fspath(shard), str(key), reason
        super().__init__(f"{self.shard}: sample {self.key!r}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.shard, self.key, self.reason)


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
    """A read and validated sample. ``image`` is uint8 HxWx3 RGB (``height x width`` unless decoded at a
    reduced scale, see :func:`decode_sample`); masks stay RLE until :meth:`mask`."""

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


def decode_sample(
    members: dict[str, bytes], *, key: str, shard: str | os.PathLike = "?", min_size: int | None = None
) -> DecodedSample:
    """Decode and validate a sample's members: all required members present, UTF-8 caption, integer
    height/width equal to the decoded image's size, segmentation JSON ``{"mask": [...]}`` with every RLE
    within bounds (checked now, decoded later by :meth:`DecodedSample.mask`). Raises BrushDataError.

    ``min_size``: decode a JPEG at the smallest libjpeg DCT scale (1/2, 1/4, 1/8) whose short side stays
    >= ``min_size`` (much faster for a source far larger than the training size); ``image`` is then
    ``ceil(height / r) x ceil(width / r)`` while ``height``/``width`` and the masks keep the stored size."""
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
    reduce = 1
    if min_size is not None and members["image"][:2] == b"\xff\xd8":  # JPEG: libjpeg scales while decoding
        reduce = max([r for r in (2, 4, 8) if min(height, width) >= r * min_size], default=1)
        flags |= _REDUCED_FLAGS[reduce]
    try:
        bgr = cv2.imdecode(np.frombuffer(members["image"], dtype=np.uint8), flags)
    except cv2.error:  # e.g. an empty buffer
        bgr = None
    if bgr is None:
        raise BrushDataError(shard, key, f"image ({len(members['image'])} bytes) could not be decoded")
    if bgr.shape[:2] != (-(-height // reduce), -(-width // reduce)):
        raise BrushDataError(
            shard,
            key,
            f"height/width say {height}x{width} but the image decodes to {bgr.shape[0]}x{bgr.shape[1]}"
            + (f" at 1/{reduce} scale" if reduce > 1 else ""),
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
