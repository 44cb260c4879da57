"""Stage 3: label the downloaded images with object masks and write official BrushData shards.

Each completed download folder (`download/p00003`, `download/p00003r1`, ...) is cut into output shards of
`samples_per_shard` consecutive images (`brushdata/p00003-00000.tar`, ...). The cut is deterministic (tar
order), so a killed run restarted with the same command skips finished shards and redoes the rest; a shard
becomes visible only when complete (brushnet.brushdata.ShardWriter renames a temp file on close).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from brushnet.brushdata import BrushDataSample, ShardWriter
from brushnet.masks import brushdata_rle_encode
from data_pipeline.config import LabelConfig
from data_pipeline.labelers import Labeler, MaskProposal, make_labeler, select_masks
from data_pipeline.layout import RunLayout, part_name
from data_pipeline.progress import Progress, StageReport
from data_pipeline.sharding import WHOLE_JOB, TaskSlice

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelShard:
    """Output shard `name` = samples [start, stop) of the concatenated tars of one download folder."""

    name: str
    unit: str
    tars: tuple[tuple[Path, int], ...]  # (img2dataset tar, number of samples in it)
    start: int
    stop: int


def _tar_samples(path: Path) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) of an img2dataset tar, in file order (reads headers only)."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    with tarfile.open(path) as tf:
        for member in tf:
            if not member.isfile() or "." not in member.name:
                continue
            key, ext = member.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = member
    return samples


def plan_unit(unit: str, folder: Path, samples_per_shard: int) -> list[LabelShard]:
    """Cut one complete img2dataset folder into output shards (only shards with a `_stats.json` count)."""
    tars = []
    for stats in sorted(Path(folder).glob("*_stats.json")):
        tar = stats.with_name(stats.name.replace("_stats.json", ".tar"))
        if tar.is_file():
            tars.append((tar, len(_tar_samples(tar))))
    total = sum(n for _, n in tars)
    return [
        LabelShard(
            f"{unit}-{j:05d}",
            unit,
            tuple(tars),
            j * samples_per_shard,
            min(total, (j + 1) * samples_per_shard),
        )
        for j in range(math.ceil(total / samples_per_shard))
    ]


def plan_label_shards(
    run_dir: Path,
    parts: list[Path],
    samples_per_shard: int,
    task: TaskSlice = WHOLE_JOB,
    split_by: str = "part",
) -> tuple[list[LabelShard], list[str]]:
    """Output shards this task owns, and the names of parts whose download is not complete.

    split_by="part": the shards of the parts this task downloads (chain: no task waits for another);
    split_by="shard": any downloaded shard whose name hashes to this task (many label processes per part).
    """
    if split_by not in ("part", "shard"):
        raise ValueError(f"split_by must be 'part' or 'shard', got {split_by!r}")
    shards, pending = [], []
    run = RunLayout(run_dir)
    for index, part in enumerate(parts):
        if split_by == "part" and not task.owns(index):
            continue
        name = part_name(part)
        folders = [f for f in run.download_folders(name) if run.read_record("download", f.name) is not None]
        if not folders:
            pending.append(name)
        for folder in folders:
            shards.extend(plan_unit(folder.name, folder, samples_per_shard))
    if split_by == "shard":  # a stable owner per shard name, whatever else is downloaded yet
        shards = [s for s in shards if task.owns(zlib.crc32(s.name.encode()))]
    return shards, pending


def iter_source_samples(shard: LabelShard) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The img2dataset samples (key, {ext: bytes}) of one output shard, in plan order."""
    offset = 0
    for tar, count in shard.tars:
        lo, hi = max(shard.start - offset, 0), min(shard.stop - offset, count)
        offset += count
        if lo >= hi:
            continue
        samples = _tar_samples(tar)
        with tarfile.open(tar) as tf:
            for key, members in samples[lo:hi]:
                yield key, {ext: tf.extractfile(m).read() for ext, m in members.items()}


def _number(value: object) -> float | None:
    """img2dataset writes missing metadata as NaN; our meta JSON is strict (None instead)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass
class _Source:
    """A decoded img2dataset sample waiting for its masks."""

    key: str  # output key: <download unit>_<img2dataset key>
    jpeg: bytes
    image: np.ndarray
    caption: str
    meta: dict


def decode_source(key: str, files: dict[str, bytes]) -> tuple[_Source | None, str | None]:
    """An img2dataset sample -> (decoded source, None) or (None, reason it is skipped)."""
    jpeg = files.get("jpg")
    if jpeg is None:
        return None, "no jpg member"
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            image = np.asarray(im.convert("RGB"))
    except Exception as e:
        return None, f"undecodable image ({type(e).__name__})"
    meta = json.loads(files["json"]) if "json" in files else {}
    caption = files["txt"].decode("utf-8") if "txt" in files else (meta.get("caption") or "")
    return _Source(key, jpeg, image, caption, meta), None


def to_sample(
    src: _Source, proposals: list[MaskProposal], labeler: Labeler, cfg: LabelConfig
) -> BrushDataSample | None:
    """Select masks and build the BrushData sample; None when no mask is kept (and such images are dropped)."""
    kept = select_masks(
        proposals,
        min_area_frac=cfg.min_area_frac,
        max_area_frac=cfg.max_area_frac,
        min_score=cfg.min_score,
        max_masks=cfg.max_masks,
    )
    if not kept and cfg.drop_images_without_masks:
        return None
    height, width = src.image.shape[:2]
    meta = {
        "url": src.meta.get("url"),
        "source_key": src.meta.get("key"),
        "aesthetic_score": _number(src.meta.get("aesthetic_score")),
        "punsafe": _number(src.meta.get("punsafe")),
        "pwatermark": _number(src.meta.get("pwatermark")),
        "masks": [
            {"area": p.area, "area_frac": round(p.area / (height * width), 6), "score": round(p.score, 6)}
            for p in kept
        ],
        "labeler": {"name": labeler.name, "version": labeler.version},
    }
    return BrushDataSample(
        key=src.key,
        image=src.jpeg,  # img2dataset's JPEG (quality 95), stored as is: height/width are its size
        caption=src.caption,
        height=height,
        width=width,
        masks=[brushdata_rle_encode(p.mask) for p in kept],
        meta=meta,
    )


def _propose_many(labeler: Labeler, images: list[np.ndarray]) -> list[list[MaskProposal]]:
    batched = getattr(labeler, "propose_batch", None)
    return batched(images) if batched is not None else [labeler.propose(im) for im in images]


def label_shard(
    shard: LabelShard, out_dir: Path, labeler: Labeler, cfg: LabelConfig, progress: Progress
) -> dict[str, int]:
    """Write `out_dir/<shard.name>.tar` (atomically), labelling `cfg.batch_size` images at a time."""
    for stale in out_dir.glob(f"{shard.name}.tar.tmp*"):  # left by a killed run of this shard
        stale.unlink()
    counts = {"ok": 0, "failed": 0, "skipped": 0}

    def count(kind: str, reason: str | None = None) -> None:
        counts[kind] += 1
        progress.update(**{kind: 1})
        if reason:
            progress.report.details[f"{kind}: {reason}"] += 1

    def flush(batch: list[_Source], writer: ShardWriter) -> None:
        try:
            proposals = _propose_many(labeler, [b.image for b in batch])
        except Exception as e:  # a labeller crash must not lose the shard: those images count as failed
            log.warning("label %s: labeller failed on %s: %s", shard.name, [b.key for b in batch], e)
            for _ in batch:
                count("failed", type(e).__name__)
            return
        for src, props in zip(batch, proposals):
            sample = to_sample(src, props, labeler, cfg)
            if sample is None:
                count("skipped", "no mask kept")
            else:
                writer.write(sample)
                count("ok")

    with ShardWriter(out_dir, shard.name) as writer:
        batch: list[_Source] = []
        for key, files in iter_source_samples(shard):
            src, reason = decode_source(f"{shard.unit}_{key}", files)
            if src is None:
                count("skipped", reason)
                continue
            batch.append(src)
            if len(batch) >= cfg.batch_size:
                flush(batch, writer)
                batch = []
        if batch:
            flush(batch, writer)
    return counts


def _is_done(shard: LabelShard, run: RunLayout) -> bool:
    if (run.brushdata / f"{shard.name}.tar").is_file():
        return True
    record = run.read_record("label", shard.name)  # a shard whose every image was skipped leaves no tar
    return record is not None and record["ok"] == 0


def run_label(
    run_dir: Path,
    parts: list[Path],
    cfg: LabelConfig,
    task: TaskSlice = WHOLE_JOB,
    labeler: Labeler | None = None,
    split_by: str = "part",
) -> StageReport:
    """Label every output shard this task owns that is not already written."""
    run = RunLayout(run_dir)
    run.brushdata.mkdir(parents=True, exist_ok=True)
    shards, pending = plan_label_shards(run.root, parts, cfg.samples_per_shard, task, split_by)
    report = StageReport("label")
    if pending:
        report.details["parts_not_downloaded"] = len(pending)
        log.warning("label: download not complete for %s; they are left for a later run", pending)
    todo = [s for s in shards if not _is_done(s, run)]
    report.details["shards_skipped"] = len(shards) - len(todo)
    report.details["shards_written"] = 0
    if not todo:
        return report
    labeler = labeler or make_labeler(cfg)
    report.details[f"labeler: {labeler.name}"] = 1
    progress = Progress(report, total=sum(s.stop - s.start for s in todo))
    try:
        for shard in todo:
            counts = label_shard(shard, run.brushdata, labeler, cfg, progress)
            if counts["ok"] == 0:  # no empty tars: the official loader counts 10,000 samples per tar file
                (run.brushdata / f"{shard.name}.tar").unlink()
            run.write_record("label", shard.name, {"shard": shard.name, **counts, "labeler": labeler.name})
            report.details["shards_written"] += 1
    finally:
        progress.close()
    return report
