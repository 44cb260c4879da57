"""Stage 1: read LAION-style metadata parquets, filter, dedupe, shuffle, write parquet parts for img2dataset."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_pipeline.config import FilterConfig
from data_pipeline.layout import (
    AESTHETIC,
    CAPTION,
    EXTRA_COLUMNS,
    HASH,
    HEIGHT,
    PUNSAFE,
    PWATERMARK,
    SUMMARY,
    URL,
    WIDTH,
)
from data_pipeline.progress import StageReport

log = logging.getLogger(__name__)

_STANDARD = {  # FilterConfig.columns field -> our column name
    "url": URL,
    "caption": CAPTION,
    "width": WIDTH,
    "height": HEIGHT,
    "aesthetic": AESTHETIC,
    "punsafe": PUNSAFE,
    "pwatermark": PWATERMARK,
    "hash": HASH,
}


class MetadataError(ValueError):
    """Metadata files are missing, empty or lack a configured column (the message names file and column)."""


def expand_metadata(paths: list[str]) -> list[Path]:
    """Files, folders (their *.parquet) and glob patterns -> a sorted, de-duplicated list of parquet files."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(path.glob("*.parquet"))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(x) for x in glob.glob(p))
        if not found:
            raise MetadataError(f"metadata path {p!r} matches no parquet file")
        files.extend(found)
    if not files:
        raise MetadataError("no metadata files given (config `metadata:` or --metadata)")
    return sorted(dict.fromkeys(files))


def read_metadata(files: list[Path], cfg: FilterConfig) -> pd.DataFrame:
    """Read the configured columns of every file, renamed to our standard names; missing column -> error."""
    wanted = {std: getattr(cfg.columns, name) for name, std in _STANDARD.items()}
    frames = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            raise MetadataError(f"{f}: not a readable parquet file ({e})") from e
        for name, std in _STANDARD.items():
            col = wanted[std]
            if col is not None and col not in schema.names:
                raise MetadataError(
                    f"{f}: column {col!r} (filter.columns.{name}) not found; the file has columns {schema.names}. "
                    f"Set filter.columns.{name} to the right name, or to null to disable it."
                )
        cols = {std: col for std, col in wanted.items() if col is not None}
        table = pq.read_table(f, columns=list(dict.fromkeys(cols.values())))
        df = table.to_pandas()
        frames.append(pd.DataFrame({std: df[col].to_numpy() for std, col in cols.items()}))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(df) == 0:
        raise MetadataError(f"metadata has no rows: {[str(f) for f in files]}")
    for std in _STANDARD.values():
        if std not in df.columns:
            df[std] = None
    return df


def apply_filters(df: pd.DataFrame, cfg: FilterConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Apply the filters in order; returns the kept rows and `dropped_<filter>` counts (of rows still alive)."""
    dropped: dict[str, int] = {}
    alive = np.ones(len(df), dtype=bool)

    def keep(name: str, mask: np.ndarray) -> None:
        nonlocal alive
        mask = np.asarray(mask, dtype=bool)
        dropped[f"dropped_{name}"] = int((alive & ~mask).sum())
        alive &= mask

    url = df[URL].astype("string")
    keep("missing_url", (url.notna() & (url.str.len() > 0)).fillna(False).to_numpy())
    num = {
        c: pd.to_numeric(df[c], errors="coerce").to_numpy(dtype="float64")
        for c in (AESTHETIC, PUNSAFE, PWATERMARK, WIDTH, HEIGHT)
    }
    # NaN comparisons are False: rows without a score are dropped when the filter is on.
    if cfg.min_aesthetic is not None and cfg.columns.aesthetic is not None:
        keep("aesthetic", num[AESTHETIC] >= cfg.min_aesthetic)
    if cfg.max_punsafe is not None and cfg.columns.punsafe is not None:
        keep("punsafe", num[PUNSAFE] < cfg.max_punsafe)
    if cfg.max_pwatermark is not None and cfg.columns.pwatermark is not None:
        keep("pwatermark", num[PWATERMARK] < cfg.max_pwatermark)
    w, h = num[WIDTH], num[HEIGHT]
    short, long = np.fmin(w, h), np.fmax(w, h)
    known = ~np.isnan(w) & ~np.isnan(h)  # unknown sizes are kept: img2dataset checks the real image
    keep("min_side", ~known | (short >= cfg.min_side))
    if cfg.max_aspect_ratio is not None:
        keep("aspect_ratio", ~known | (long <= cfg.max_aspect_ratio * short))
    for key in cfg.dedupe:
        if key not in (URL, HASH):
            raise MetadataError(f"filter.dedupe: expected 'url' and/or 'hash', got {key!r}")
        if key == HASH and cfg.columns.hash is None:
            continue
        col = df[key][alive]
        dup = (col.notna() & col.duplicated(keep="first")).to_numpy()
        mask = np.ones(len(df), dtype=bool)
        mask[np.flatnonzero(alive)[dup]] = False
        keep(f"duplicate_{key}", mask)
    return df[alive], dropped


def _write_parts(df: pd.DataFrame, folder: Path, rows_per_part: int) -> int:
    out = pd.DataFrame(
        {
            URL: df[URL].astype(str).to_numpy(),
            CAPTION: df[CAPTION].fillna("").astype(str).to_numpy(),
            **{c: pd.to_numeric(df[c], errors="coerce").astype("float64").to_numpy() for c in EXTRA_COLUMNS},
            WIDTH: pd.to_numeric(df[WIDTH], errors="coerce").astype("float64").to_numpy(),
            HEIGHT: pd.to_numeric(df[HEIGHT], errors="coerce").astype("float64").to_numpy(),
        }
    )
    n_parts = -(-len(out) // rows_per_part)
    for i in range(n_parts):
        part = out.iloc[i * rows_per_part : (i + 1) * rows_per_part]
        part.to_parquet(folder / f"part-{i:05d}.parquet", index=False)
    return n_parts


def run_filter(metadata: list[str], out_dir: Path, cfg: FilterConfig) -> StageReport:
    """Write `out_dir/part-XXXXX.parquet` + `_SUMMARY.json` atomically (folder rename); skip if already done."""
    report = StageReport("filter", unit="rows")
    out_dir = Path(out_dir)
    if (out_dir / SUMMARY).is_file():
        summary = json.loads((out_dir / SUMMARY).read_text())
        log.info("filter: %s already complete (%d rows kept), skipping", out_dir, summary["kept"])
        report.skipped = summary["kept"]
        report.details["parts"] = summary["parts"]
        return report
    if cfg.rows_per_part < 1:
        raise MetadataError(f"filter.rows_per_part must be >= 1, got {cfg.rows_per_part}")
    start = time.perf_counter()
    files = expand_metadata(metadata)
    df = read_metadata(files, cfg)
    total = len(df)
    df, dropped = apply_filters(df, cfg)
    if cfg.shuffle:
        df = df.iloc[np.random.default_rng(cfg.seed).permutation(len(df))]
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_parts = _write_parts(df, tmp, cfg.rows_per_part)
    summary = {
        "input_files": [str(f) for f in files],
        "input_rows": total,
        "kept": len(df),
        "parts": n_parts,
        "dropped": dropped,
        "config": asdict(cfg),
    }
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=2))
    try:
        if out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except OSError:  # another array task finished the same (deterministic) filter first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / SUMMARY).is_file():
            raise
    report.ok = len(df)
    report.skipped = total - len(df)
    report.details.update(dropped)
    report.details["parts"] = n_parts
    report.seconds = time.perf_counter() - start
    log.info("filter: kept %d of %d rows in %d part(s); dropped %s", len(df), total, n_parts, dropped)
    return report
