"""Run filter -> download -> label -> validate for one config (one task of an array job, or everything)."""

from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline.config import PipelineConfig
from data_pipeline.download import run_download
from data_pipeline.filter import list_parts, run_filter
from data_pipeline.label import run_label
from data_pipeline.progress import StageReport, format_summary
from data_pipeline.sharding import WHOLE_JOB, TaskSlice
from data_pipeline.validate import run_validate

log = logging.getLogger(__name__)


def stage_failed(report: StageReport) -> bool:
    """A stage that leaves work undone (the command should exit non-zero so schedulers notice)."""
    d = report.details
    return bool(
        d.get("shards_incomplete") or d.get("parts_not_downloaded") or d.get("shards_with_bad_samples")
    )


def run_chain(cfg: PipelineConfig, task: TaskSlice = WHOLE_JOB) -> int:
    """All four stages; each skips what is already done. Prints the summary table; returns the exit code."""
    run_dir = Path(cfg.out)
    reports = [run_filter(cfg.metadata, run_dir / "filtered", cfg.filter)]
    parts = list_parts(run_dir / "filtered")
    reports.append(run_download(parts, run_dir, cfg.download, task))
    reports.append(run_label(run_dir, parts, cfg.label, task))
    reports.append(run_validate(run_dir, task))
    print(format_summary(reports), flush=True)
    return 1 if any(stage_failed(r) for r in reports) else 0
