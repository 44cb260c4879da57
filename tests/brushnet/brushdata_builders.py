"""Tiny real-photo BrushData samples and shards for the brushdata tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np

from brushnet.brushdata import (
    BrushDataSample,
    ShardWriter,
)
from brushnet.masks import brushdata_rle_encode


@cache
def photo(h: int, w: int) -> np.ndarray:
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)


def jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def masks(h: int, w: int) -> list[np.ndarray]:
    a = np.zeros((h, w), bool)
    a[2:10, 5:20] = True
    b = np.zeros((h, w), bool)
    b[h // 2 :, : w // 3] = True
    return [a, b]


def make_sample(key: str = "k0001", h: int = 24, w: int = 40, meta: dict | None = None) -> BrushDataSample:
    return BrushDataSample(
        key=key,
        image=jpeg(photo(h, w)),
        caption="an astronaut — café",
        height=h,
        width=w,
        masks=[brushdata_rle_encode(m) for m in masks(h, w)],
        meta=meta,
    )


def write_shard(folder: Path, name: str, keys: list[str], **kw) -> Path:
    with ShardWriter(folder, name) as writer:
        for key in keys:
            writer.write(make_sample(key, **kw))
    return folder / f"{name}.tar"
