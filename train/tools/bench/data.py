"""Loader samples/s: ``BrushDataModule`` with 0/1/2 workers against the official collate on the main process.

The baseline is written like ``MyWebDataset.__call__`` of the official ``examples/brushnet/train_brushnet.py``
(run as the DataLoader's collate on the main process): OpenCV decode at full size, the chosen RLE decoded
at full size with a Python loop over runs, erode/dilate, image / masked image / mask each resized bicubic,
random crop, float32 normalisation, per-sample tokenisation, ``torch.stack``. Both read the same samples
through the same byte-offset table, so the difference is the per-sample work and what crosses processes.
The data: ``skimage.data`` photographs re-encoded as JPEG at a given size, 3 elliptic object masks each.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from brushnet.brushdata import BrushDataSample, ShardWriter
from brushnet.masks import brushdata_rle_encode
from brushnet.testing.tiny import write_clip_tokenizer
from train.data import BrushDataModule
from train.tools.bench.common import interleaved, median, spread

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat")
# 640x480: a small photo; 1365x1024: what the data pipeline stores by default (short side 1024, keep ratio)
SOURCES = {"640x480": (480, 640), "1365x1024": (1024, 1365)}


def build_data(folder: Path, samples: int, height: int, width: int, per_shard: int = 32) -> list[Path]:
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
                    m = np.zeros((height, width), np.uint8)
                    center = (
                        int(rng.integers(width // 4, 3 * width // 4)),
                        int(rng.integers(height // 4, 3 * height // 4)),
                    )
                    axes = (
                        int(rng.integers(width // 10, width // 4)),
                        int(rng.integers(height // 10, height // 4)),
                    )
                    cv2.ellipse(m, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
                    masks.append(brushdata_rle_encode(m > 0))
                writer.write(
                    BrushDataSample(f"k{i:06d}", buf.tobytes(), "a photo of a thing", height, width, masks)
                )
        paths.append(folder / f"{name}.tar")
    return paths


class OfficialCollate:
    """The official per-batch transform (segmentation masks, p=0.3 opening, p=0.5 inversion)."""

    def __init__(self, tokenizer, resolution: int, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.random = random.Random(seed)

    @staticmethod
    def rle2mask(mask_rle: list[int], shape: tuple[int, int]) -> np.ndarray:
        mask_rle = np.array(mask_rle)
        starts, lengths = [np.asarray(x, dtype=int) for x in (mask_rle[0:][::2], mask_rle[1:][::2])]
        starts -= 1
        img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
        for lo, hi in zip(starts, starts + lengths):
            img[lo:hi] = 1
        return img.reshape(shape, order="F")

    def __call__(self, examples: list[dict[str, bytes]]) -> dict:
        res, rnd = self.resolution, self.random
        pixel_values, conditioning, masks, input_ids = [], [], [], []
        for ex in examples:
            caption = ex["caption"].decode("utf-8")
            height, width = int(ex["height"].decode()), int(ex["width"].decode())
            image = cv2.imdecode(np.frombuffer(ex["image"], dtype=np.uint8), cv2.IMREAD_COLOR)
            segmentation = json.loads(ex["segmentation"])
            mask = self.rle2mask(rnd.choice(segmentation["mask"]), (height, width))[:, :, None]
            if rnd.random() < 0.3:
                kernel = np.ones((8, 8), np.uint8)
                mask = cv2.dilate(cv2.erode(mask, kernel, iterations=1), kernel, iterations=1)
                mask = (1 * (mask > 0))[:, :, None].astype(np.uint8)
            masked_image = image * mask
            if rnd.random() < 0.5:
                masked_image = image - masked_image
                mask = 1 - mask
            h, w = image.shape[:2]
            scale = res / min(h, w)
            h_new, w_new = int(np.ceil(h * scale)), int(np.ceil(w * scale))
            image = cv2.resize(image, (w_new, h_new), interpolation=cv2.INTER_CUBIC)
            masked_image = cv2.resize(masked_image, (w_new, h_new), interpolation=cv2.INTER_CUBIC)
            mask = cv2.resize(mask, (w_new, h_new), interpolation=cv2.INTER_CUBIC)[:, :, None]
            top, left = rnd.randint(0, h_new - res), rnd.randint(0, w_new - res)
            window = (slice(top, top + res), slice(left, left + res))
            image = cv2.cvtColor(image[window], cv2.COLOR_BGR2RGB)
            masked_image = cv2.cvtColor(masked_image[window], cv2.COLOR_BGR2RGB)
            pixel_values.append(torch.tensor(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            conditioning.append(torch.tensor(masked_image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            masks.append(torch.tensor(mask[window].astype(np.float32)).permute(2, 0, 1))
            input_ids.append(
                self.tokenizer(
                    caption,
                    max_length=self.tokenizer.model_max_length,
                    padding="max_length",
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
            )
        return {
            "pixel_values": torch.stack(pixel_values).contiguous().float(),
            "conditioning_pixel_values": torch.stack(conditioning).contiguous().float(),
            "masks": torch.stack(masks).contiguous().float(),
            "input_ids": torch.stack(input_ids),
        }


def batch_bytes(batch: dict) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def _rate(batches, cpu: list[float]) -> float:
    """Samples/s of the wall clock over ``batches`` after the first (workers started, first batch out);
    appends this process's samples per CPU-second to ``cpu`` (the per-core rate, robust to a shared
    machine, meaningful when the work runs in this process)."""
    it = iter(batches)
    next(it)
    wall, proc, n = time.perf_counter(), time.process_time(), 0
    for batch in it:
        n += batch["input_ids"].shape[0]
    cpu.append(n / (time.process_time() - proc))
    return n / (time.perf_counter() - wall)


def bench_source(
    shards: list[Path],
    tok: Path,
    cache: Path,
    resolution: int,
    batch_size: int,
    workers: tuple[int, ...],
    repeats: int,
) -> dict[str, dict]:
    """One data set: the official baseline and our DataModule per worker count, interleaved."""
    from transformers import CLIPTokenizer

    modules = {
        w: BrushDataModule(
            train_shards=[str(p) for p in shards],
            tokenizer=str(tok),
            resolution=resolution,
            batch_size=batch_size,
            num_workers=w,
            index_cache_dir=str(cache),
        )
        for w in workers
    }
    loaders = {w: dm.train_dataloader_for(0, 1) for w, dm in modules.items()}
    table = modules[workers[0]].table
    collate = OfficialCollate(CLIPTokenizer.from_pretrained(str(tok), subfolder="tokenizer"), resolution)
    fds: dict[str, int] = {}

    def official_batches():
        for b in range(len(table) // batch_size):
            yield collate([table.read_members(i, fds) for i in range(b * batch_size, (b + 1) * batch_size)])

    cpu: dict[str, list[float]] = {"official": []} | {f"ours_{w}w": [] for w in workers}
    variants = {"official": lambda: _rate(official_batches(), cpu["official"])}
    variants.update({f"ours_{w}w": (lambda w=w: _rate(loaders[w], cpu[f"ours_{w}w"])) for w in workers})
    runs = interleaved(variants, repeats=repeats)
    mb = {
        "official": batch_bytes(next(official_batches())),
        "ours": batch_bytes(next(iter(loaders[workers[0]]))),
    }
    return {
        name: {
            "wall": values,
            "cpu": cpu[name],
            "batch_mb": mb["official" if name == "official" else "ours"] / 1e6,
        }
        for name, values in runs.items()
    }


def bench_loader(
    resolution: int = 512,
    batch_size: int = 2,
    samples: int = 48,
    workers: tuple[int, ...] = (0, 1, 2),
    sources: tuple[str, ...] = tuple(SOURCES),
    repeats: int = 3,
) -> list[dict]:
    """Samples/s (median over interleaved repeats) per source size: the official baseline and ours per
    worker count, plus the bytes one batch moves between processes."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "base"
        write_clip_tokenizer(tok / "tokenizer", vocab="clip")
        for source in sources:
            shards = build_data(Path(tmp) / source, samples, *SOURCES[source])
            runs = bench_source(shards, tok, Path(tmp) / "cache", resolution, batch_size, workers, repeats)
            base, base_cpu = median(runs["official"]["wall"]), median(runs["official"]["cpu"])
            for name, run in runs.items():
                row = {
                    "source": source,
                    "loader": name,
                    "workers": 0 if name == "official" else int(name.split("_")[1][:-1]),
                    "samples_per_s": round(median(run["wall"]), 1),
                    "range": [round(v, 1) for v in spread(run["wall"])],
                    "vs_official": round(median(run["wall"]) / base, 2),
                    "batch_mb": round(run["batch_mb"], 2),
                }
                if row["workers"] == 0:  # all work on this process: its CPU time is the cost
                    row["samples_per_cpu_s"] = round(median(run["cpu"]), 1)
                    row["cpu_vs_official"] = round(median(run["cpu"]) / base_cpu, 2)
                rows.append(row)
    return rows
