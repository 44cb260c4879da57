"""The embedded default (`make data`): skimage photographs served on loopback -> the full chain, offline."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from data_pipeline.cli import run_chain
from data_pipeline.config import PipelineConfig
from data_pipeline.layout import RunLayout
from data_pipeline.tools.http_server import serve_folder
from data_pipeline.tools.photos import PHOTOS, build_photo_site, demo_filtered_rows, write_metadata

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo.yaml"


def run_demo(cfg: PipelineConfig) -> int:
    """Build the demo site, serve it on 127.0.0.1, run the whole chain into `cfg.out`; returns the exit code."""
    run = RunLayout(Path(cfg.out))
    if run.read_record("download", "p00000") is None:
        # URLs embed this run's random port: an interrupted earlier run's parts point at a dead server.
        for stale in (run.filtered, run.download, run.state("download")):
            shutil.rmtree(stale, ignore_errors=True)
    rows = build_photo_site(run.site) + demo_filtered_rows(run.site)
    with serve_folder(run.site) as base_url:
        log.info("demo: serving %d photos at %s", len(PHOTOS), base_url)
        # Completed downloads of an earlier run are reused as they are (their URLs are not fetched again).
        cfg.metadata = [str(write_metadata(rows, base_url, run.metadata / "demo.parquet"))]
        return run_chain(cfg)
