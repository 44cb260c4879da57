"""Stage 2: download the images of each filtered part with img2dataset (webdataset output), resumable.

Each part is one img2dataset run into `download/<part>/` (then retry rounds `<part>r1`, ...: the rows whose
`status != success`); its `state/download/<unit>.json` record is written when the folder is complete
(folder names: data_pipeline.layout).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from data_pipeline.config import DownloadConfig
from data_pipeline.layout import CAPTION, EXTRA_COLUMNS, URL, RunLayout, part_name, retry_name
from data_pipeline.progress import StageReport
from data_pipeline.sharding import WHOLE_JOB, TaskSlice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadUnit:
    """One img2dataset run: an input parquet and the folder it writes."""

    name: str  # p00003 or p00003r1; also the prefix of every sample key and label shard made from it
    input: Path
    folder: Path


def read_stats(folder: Path) -> list[dict]:
    """img2dataset's per-shard `<shard>_stats.json` files (present only for completed shards), in shard order."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*_stats.json"))]


def run_img2dataset(unit: DownloadUnit, cfg: DownloadConfig) -> None:
    """Run img2dataset in this process (it spawns its own worker pool); incremental mode skips done shards."""
    from img2dataset import download  # heavy import (albumentations, ...)

    unit.folder.mkdir(parents=True, exist_ok=True)
    download(
        url_list=str(unit.input),
        input_format="parquet",
        url_col=URL,
        caption_col=CAPTION,
        save_additional_columns=list(EXTRA_COLUMNS),
        output_folder=str(unit.folder),
        output_format="webdataset",
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio,
        encode_quality=cfg.encode_quality,
        encode_format="jpg",
        number_sample_per_shard=cfg.samples_per_shard,
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        timeout=cfg.timeout,
        retries=cfg.retries,
        incremental_mode="incremental",
        distributor="multiprocessing",
        enable_wandb=False,
        extract_exif=False,
        user_agent_token=cfg.user_agent_token,
        # img2dataset's opt-out check: skip images served with X-Robots-Tag noai/noimageai/... headers.
        disallowed_header_directives=list(cfg.disallowed_header_directives),
    )


def _failed_rows(folder: Path) -> pd.DataFrame:
    frames = [pq.read_table(p).to_pandas() for p in sorted(folder.glob("*.parquet"))]
    if not frames:
        return pd.DataFrame(columns=[URL, CAPTION, *EXTRA_COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    df = df[df["status"] != "success"]
    return pd.DataFrame({c: df.get(c) for c in [URL, CAPTION, *EXTRA_COLUMNS]})


def _download_unit(unit: DownloadUnit, run: RunLayout, cfg: DownloadConfig, report: StageReport) -> bool:
    """Download one unit unless its state record exists; returns True when the unit is complete."""
    stats = run.read_record("download", unit.name)
    if stats is not None:
        report.skipped += stats["successes"]
        report.details["units_skipped"] += 1
        return True
    rows = pq.ParquetFile(unit.input).metadata.num_rows
    expected = math.ceil(rows / cfg.samples_per_shard)
    log.info("download %s: %d urls -> %s", unit.name, rows, unit.folder)
    run_img2dataset(unit, cfg)
    stats = read_stats(unit.folder)
    totals = {
        k: sum(s[k] for s in stats) for k in ("count", "successes", "failed_to_download", "failed_to_resize")
    }
    report.ok += totals["successes"]
    report.failed += totals["failed_to_download"] + totals["failed_to_resize"]
    for s in stats:
        for reason, n in s["status_dict"].items():
            if reason != "success":
                report.details[f"failed: {reason[:80]}"] += n
    if len(stats) < expected:
        report.details["shards_incomplete"] += expected - len(stats)
        log.warning(
            "download %s: %d of %d shards incomplete; rerun the same command",
            unit.name,
            expected - len(stats),
            expected,
        )
        return False
    record = {"name": unit.name, "input": str(unit.input), "shards": len(stats), **totals}
    run.write_record("download", unit.name, record)
    return True


def run_download(
    parts: list[Path], run_dir: Path, cfg: DownloadConfig, task: TaskSlice = WHOLE_JOB
) -> StageReport:
    """Download the parts this task owns (part i belongs to task i % num_shards), then the retry rounds."""
    report = StageReport("download")
    start = time.perf_counter()
    run = RunLayout(run_dir)
    for index, part in enumerate(parts):
        if not task.owns(index):
            continue
        name = part_name(part)
        unit = DownloadUnit(name, part, run.download / name)
        complete = _download_unit(unit, run, cfg, report)
        for round_ in range(1, cfg.retry_failed_rounds + 1):
            if not complete:
                break
            retry_unit = retry_name(name, round_)
            retry = DownloadUnit(retry_unit, run.retry_input(retry_unit), run.download / retry_unit)
            if run.read_record("download", retry.name) is None:
                failed = _failed_rows(unit.folder)
                if failed.empty:
                    break
                retry.input.parent.mkdir(parents=True, exist_ok=True)
                failed.to_parquet(retry.input, index=False)
                report.details["retried_rows"] += len(failed)
            complete = _download_unit(retry, run, cfg, report)
            unit = retry
    report.seconds = time.perf_counter() - start
    return report
