"""Loader throughput on CPU: indexed (seek into tars) vs stream (webdataset) mode.

    python -m train.tools.bench_data --samples 128 --workers 2 --resolution 512

Builds a temporary BrushData set from ``skimage.data`` photographs (640x480 JPEGs, 3 object masks each) and a
tiny tokenizer, then times one epoch of each mode after the workers started (first batch excluded)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from brushnet.brushdata import BrushDataSample, ShardWriter
from brushnet.masks import brushdata_rle_encode
from brushnet.testing.tiny import write_clip_tokenizer
from train.data import BrushDataModule

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat")


def build_data(folder: Path, samples: int, per_shard: int, height: int = 480, width: int = 640) -> list[Path]:
    import skimage.data

    photos = [cv2.resize(getattr(skimage.data, n)()[..., :3], (width, height)) for n in PHOTOS]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, samples, per_shard):
        name = f"bench-{start // per_shard:03d}"
        with ShardWriter(folder, name) as writer:
            for i in range(start, min(samples, start + per_shard)):
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photos[i % len(photos)], cv2.COLOR_RGB2BGR))
                assert ok
                masks = []
                for _ in range(3):
                    m = np.zeros((height, width), bool)
                    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
                    m[top : top + height // 3, left : left + width // 3] = True
                    masks.append(brushdata_rle_encode(m))
                writer.write(
                    BrushDataSample(f"k{i:06d}", buf.tobytes(), "a photo", height, width, masks, None)
                )
        paths.append(folder / f"{name}.tar")
    return paths


def time_epoch(dm: BrushDataModule) -> float:
    loader = dm.train_dataloader_for(0, 1)
    it = iter(loader)
    next(it)  # workers started, first batch out
    start, n = time.perf_counter(), 0
    for batch in it:
        n += len(batch["keys"])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_data(Path(tmp) / "data", args.samples, args.per_shard)
        write_clip_tokenizer(Path(tmp) / "base" / "tokenizer")
        common = dict(
            train_shards=[str(p) for p in shards],
            tokenizer=str(Path(tmp) / "base"),
            resolution=args.resolution,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        for mode in ("indexed", "stream"):
            rate = time_epoch(BrushDataModule(mode=mode, shuffle_buffer=64, **common))
            print(
                f"{mode:8s} {rate:7.1f} samples/s  ({args.workers} workers, {args.resolution}px, 640x480 JPEGs)"
            )


if __name__ == "__main__":
    main()
