"""Stage 4: decode every sample of every BrushData shard, report bad samples, write the index JSON.

Per-shard results are cached in the `validate` state records (keyed by the tar's size and mtime), so the
stage is resumable and splits across array tasks; the index (`index.json` beside `brushdata/`) is written
by a single-task run (`--num-shards 1`, reusing the cached checks) and lists only shards without bad samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from brushnet.brushdata import BrushDataError, decode_sample, read_sample, scan_shard, write_index
from data_pipeline.layout import RunLayout
from data_pipeline.progress import Progress, StageReport
from data_pipeline.sharding import WHOLE_JOB, TaskSlice

log = logging.getLogger(__name__)


@dataclass
class ShardCheck:
    shard: str
    size: int
    mtime_ns: int
    samples: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)  # {"shard", "key", "reason"}


def check_shard(path: Path) -> ShardCheck:
    """Decode every sample (image, caption, sizes, RLE bounds) of one shard; never raises on bad data."""
    stat = path.stat()
    check = ShardCheck(path.name, stat.st_size, stat.st_mtime_ns)
    try:
        records = scan_shard(path)
    except Exception as e:  # unreadable tar: the whole shard is bad
        check.bad.append({"shard": path.name, "key": "*", "reason": f"unreadable shard: {e}"})
        return check
    for record in records:
        check.samples += 1
        try:
            decode_sample(read_sample(path, record), key=record.key, shard=path.name)
        except BrushDataError as e:
            check.bad.append({"shard": path.name, "key": record.key, "reason": e.reason})
        except Exception as e:
            check.bad.append({"shard": path.name, "key": record.key, "reason": f"{type(e).__name__}: {e}"})
    return check


def _cached(run: RunLayout, tar: Path) -> ShardCheck | None:
    record = run.read_record("validate", tar.stem)
    if record is None:
        return None
    check = ShardCheck(**record)
    stat = tar.stat()
    return check if (check.size, check.mtime_ns) == (stat.st_size, stat.st_mtime_ns) else None


def run_validate(run_dir: Path, task: TaskSlice = WHOLE_JOB) -> StageReport:
    """Check the shards this task owns (unless cached), then write the index when every shard is checked."""
    run = RunLayout(run_dir)
    report = StageReport("validate", unit="samples")
    tars = sorted(run.brushdata.glob("*.tar"))
    checks: dict[str, ShardCheck] = {}
    todo = []
    for i, tar in enumerate(tars):
        cached = _cached(run, tar)
        if cached is not None:
            checks[tar.name] = cached
            report.skipped += cached.samples
        elif task.owns(i):
            todo.append(tar)
    progress = Progress(report)
    for tar in todo:
        check = check_shard(tar)
        run.write_record("validate", tar.stem, check.__dict__)
        checks[tar.name] = check
        progress.update(ok=check.samples - len(check.bad), failed=len(check.bad))
    progress.close()
    for check in checks.values():
        for bad in check.bad:
            log.error("bad sample: shard=%s key=%s reason=%s", bad["shard"], bad["key"], bad["reason"])
            report.details["bad samples"] += 1
    if task.num_shards > 1:  # other tasks may still be labelling: the index is written by a single-task run
        report.details["shards_left_to_other_tasks"] = len(tars) - len(checks)
        return report
    good = [t for t in tars if not checks[t.name].bad]
    write_index(good, run.index, root=run.root)
    report.details["index_shards"] = len(good)
    report.details["index_samples"] = sum(checks[t.name].samples for t in good)
    report.details["shards_with_bad_samples"] = len(tars) - len(good)
    log.info("index: %s (%d shards, %d samples)", run.index, len(good), report.details["index_samples"])
    return report
