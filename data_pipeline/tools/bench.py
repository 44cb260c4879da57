"""`python -m data_pipeline bench --out DIR`: label images/s per labeller, shard write and index MB/s, and
the img2dataset download rate on loopback. Prints one JSON object (also written to DIR/bench.json)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from brushnet.brushdata import BrushDataSample, ShardWriter, write_index
from brushnet.masks import brushdata_rle_encode
from data_pipeline.config import ClassicalConfig, DownloadConfig, SamConfig
from data_pipeline.download import DownloadUnit, read_stats, run_img2dataset
from data_pipeline.labelers import Labeler, select_masks
from data_pipeline.labelers.classical import ClassicalLabeler
from data_pipeline.labelers.sam import SamLabeler
from data_pipeline.layout import CAPTION, EXTRA_COLUMNS, URL
from data_pipeline.tools.http_server import serve_folder
from data_pipeline.tools.photos import PHOTOS, build_photo_site

log = logging.getLogger(__name__)


def _photos(site: Path, n: int) -> list[np.ndarray]:
    files = sorted(site.glob("*.jpg"))
    return [np.asarray(Image.open(files[i % len(files)]).convert("RGB")) for i in range(n)]


def bench_labeler(labeler: Labeler, images: list[np.ndarray]) -> dict:
    labeler.propose(images[0])  # warm-up (lazy imports, first allocation)
    start = time.perf_counter()
    masks = sum(len(labeler.propose(im)) for im in images)
    seconds = time.perf_counter() - start
    return {
        "labeler": labeler.name,
        "images": len(images),
        "images_per_s": round(len(images) / seconds, 3),
        "masks_per_image": round(masks / len(images), 1),
        "pixels": int(np.mean([im.size // 3 for im in images])),
    }


def bench_shard_write(out: Path, images: list[np.ndarray], samples: int = 200) -> dict:
    labeler = ClassicalLabeler()
    prepared = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
        kept = select_masks(
            labeler.propose(im), min_area_frac=0.01, max_area_frac=0.8, min_score=0, max_masks=16
        )
        prepared.append((buf.getvalue(), im.shape[:2], [brushdata_rle_encode(p.mask) for p in kept]))
    start = time.perf_counter()
    with ShardWriter(out, "bench") as writer:
        for i in range(samples):
            jpg, (h, w), rles = prepared[i % len(prepared)]
            writer.write(BrushDataSample(f"s{i:06d}", jpg, "a caption", h, w, rles, {"i": i}))
    seconds = time.perf_counter() - start
    size = (out / "bench.tar").stat().st_size
    return {
        "samples": samples,
        "mb": round(size / 1e6, 1),
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "samples_per_s": round(samples / seconds, 1),
    }


def bench_index(shard: Path, repeats: int = 3) -> dict:
    """write_index on one shard: the tar scan (member offsets from the headers) and the sha256 of the data."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        index = write_index([shard], shard.with_name("bench-index.json"))
        seconds.append(time.perf_counter() - start)
    best, size = min(seconds), shard.stat().st_size
    return {
        "samples": index.num_samples,
        "samples_per_s": round(index.num_samples / best, 1),
        "mb_per_s": round(size / 1e6 / best, 1),
    }


def bench_download(out: Path, site: Path, urls: int, processes: int) -> dict:
    names = [f"{name}.jpg" for name, _ in PHOTOS]
    with serve_folder(site) as base:
        meta = out / "urls.parquet"  # filter-stage output columns
        pd.DataFrame(
            {
                URL: [f"{base}/{names[i % len(names)]}?i={i}" for i in range(urls)],
                CAPTION: [f"image {i}" for i in range(urls)],
                **{c: [0.5] * urls for c in EXTRA_COLUMNS},
            }
        ).to_parquet(meta, index=False)
        unit = DownloadUnit("bench", meta, out / f"download-p{processes}")
        cfg = DownloadConfig(
            image_size=512,
            processes_count=processes,
            thread_count=32,
            samples_per_shard=max(1, urls // (2 * processes)),
        )
        start = time.perf_counter()
        run_img2dataset(unit, cfg)
        wall = time.perf_counter() - start
    stats = read_stats(unit.folder)
    ok = sum(s["successes"] for s in stats)
    busy = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {
        "urls": urls,
        "processes": processes,
        "successes": ok,
        "images_per_s_wall": round(ok / wall, 1),
        "images_per_s_downloading": round(ok / busy, 1),
        "wall_s": round(wall, 1),
    }


def bench_sam_encoder(model_type: str, repeats: int = 2) -> dict:
    """Seconds per image of a full-size SAM image encoder (random weights: compute cost only, no masks)."""
    from segment_anything import sam_model_registry

    sam = sam_model_registry[model_type](checkpoint=None).eval()
    x = torch.zeros(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    with torch.inference_mode():
        sam.image_encoder(x)
        start = time.perf_counter()
        for _ in range(repeats):
            sam.image_encoder(x)
    seconds = (time.perf_counter() - start) / repeats
    return {
        "labeler": f"sam-{model_type} image encoder only",
        "seconds_per_image": round(seconds, 2),
        "images_per_s_upper_bound": round(1 / seconds, 3),
    }


def run_bench(out: Path, images: int = 8, urls: int = 200, sam_encoder: str | None = None) -> int:
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    site = out / "site"
    build_photo_site(site)
    pics = _photos(site, images)
    torch.manual_seed(0)
    results: dict = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    results["label"] = [
        bench_labeler(ClassicalLabeler(ClassicalConfig()), pics),
        bench_labeler(
            SamLabeler(
                SamConfig(
                    model_type="tiny", points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0
                )
            ),
            pics[: max(2, images // 4)],
        ),
    ]
    if sam_encoder:
        results["label"].append(bench_sam_encoder(sam_encoder))
    results["shard_write"] = bench_shard_write(out, pics)
    results["index"] = bench_index(out / "bench.tar")
    results["download"] = [bench_download(out, site, urls, p) for p in (1, 2)]
    text = json.dumps(results, indent=2)
    (out / "bench.json").write_text(text)
    print(text)
    return 0
