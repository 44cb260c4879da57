"""Tiny BrushData shards (real photographs from ``skimage.data``) and tokenizer folders for the data tests."""

from __future__ import annotations

import io
import tarfile
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from brushnet.brushdata import BrushDataSample, ShardWriter, encode_sample
from brushnet.masks import brushdata_rle_encode
from brushnet.testing.tiny import write_clip_tokenizer

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat")
CAPTIONS = ("an astronaut", "a cup of coffee", "a cat", "a rocket", "cells", "a tabby cat")


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


def photo(i: int, height: int, width: int) -> np.ndarray:
    return cv2.resize(_photo(PHOTOS[i % len(PHOTOS)]), (width, height), interpolation=cv2.INTER_AREA)


def jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def object_masks(i: int, height: int, width: int, count: int) -> list[np.ndarray]:
    """``count`` distinct rectangles (1 = object)."""
    out = []
    for j in range(count):
        m = np.zeros((height, width), bool)
        top, left = (3 * i + 5 * j) % (height // 2), (7 * i + 3 * j) % (width // 2)
        m[top : top + height // 3, left : left + width // 3] = True
        out.append(m)
    return out


def make_sample(key: str, i: int, height: int = 48, width: int = 64, num_masks: int = 2) -> BrushDataSample:
    return BrushDataSample(
        key=key,
        image=jpeg(photo(i, height, width)),
        caption=CAPTIONS[i % len(CAPTIONS)],
        height=height,
        width=width,
        masks=[brushdata_rle_encode(m) for m in object_masks(i, height, width, num_masks)],
        meta=None,
    )


def write_shards(folder: Path, counts: list[int], prefix: str = "shard", **sample_kw) -> list[Path]:
    """Shards ``<prefix>-000.tar``... with ``counts[k]`` samples each; keys are unique across shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for k, count in enumerate(counts):
        name = f"{prefix}-{k:03d}"
        with ShardWriter(folder, name) as writer:
            for _ in range(count):
                writer.write(make_sample(f"s{n:05d}", n, **sample_kw))
                n += 1
        paths.append(folder / f"{name}.tar")
    return paths


def write_raw_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """An official-layout tar (``<key>.<member>``) with exactly the given member bytes (for bad samples)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_members(key: str, i: int, **kw) -> dict[str, bytes]:
    return encode_sample(make_sample(key, i, **kw))


def tokenizer_folder(folder: Path, sdxl: bool = False) -> Path:
    """A base-model-like folder holding only ``tokenizer/`` (and ``tokenizer_2/``)."""
    write_clip_tokenizer(folder / "tokenizer")
    if sdxl:
        write_clip_tokenizer(folder / "tokenizer_2")
    return folder
