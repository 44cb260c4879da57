"""Scoring generated benchmark images, and the small in-memory evaluation the trainer runs every N steps."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from brushnet.evaluation.benchmark import (
    BENCH_SIZE,
    BenchmarkError,
    BenchmarkItem,
    GenerationSettings,
    inpaint_item,
    load_source,
    output_paths,
)
from brushnet.evaluation.metrics import LPIPSMetric, preserved_region_errors
from brushnet.evaluation.scorers import ModelPaths, Scorer, build_scorers


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool


# Column name -> label. The "official" columns reproduce evaluate_brushnet.py's formulas (paper tables).
METRICS: dict[str, MetricInfo] = {
    "image_reward": MetricInfo("ImageReward", True),
    "hps_v2.1": MetricInfo("HPS v2.1", True),
    "aesthetic_score": MetricInfo("Aesthetic score", True),
    "psnr": MetricInfo("PSNR, per-channel (dB)", True),
    "psnr_official": MetricInfo("PSNR, official formula (dB; = PSNR - 4.77)", True),
    "lpips": MetricInfo("LPIPS (preserved region)", False),
    "mse": MetricInfo("MSE, per-channel", False),
    "mse_official": MetricInfo("MSE, official formula (= 3 x MSE)", False),
    "clip_similarity": MetricInfo("CLIP similarity", True),
}


@dataclass
class Evaluator:
    """Every metric that can run here; ``unavailable`` maps the others to the reason (path looked for)."""

    scorers: dict[str, Scorer] = field(default_factory=dict)
    lpips: LPIPSMetric | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_paths(
        cls, paths: ModelPaths, device: str = "cpu", only: Sequence[str] | None = None
    ) -> Evaluator:
        """Load the configured metrics; ``only`` restricts the model-based ones (names of :data:`METRICS`)."""
        scorers, unavailable = build_scorers(paths, device=device, only=only)
        lpips = None
        if only is None or "lpips" in only:
            try:
                lpips = LPIPSMetric(paths.lpips.net, paths.lpips.backbone, device=device)
            except FileNotFoundError as e:
                unavailable["lpips"] = str(e)
        return cls(scorers=scorers, lpips=lpips, unavailable=unavailable)

    @property
    def columns(self) -> list[str]:
        """Metric columns this evaluator fills, in :data:`METRICS` order."""
        have = {"psnr", "psnr_official", "mse", "mse_official", *self.scorers}
        if self.lpips is not None:
            have.add("lpips")
        return [m for m in METRICS if m in have]

    def score(self, source: np.ndarray, generated: np.ndarray, inpaint: np.ndarray, caption: str) -> dict:
        """All available metrics of one generated image (uint8 HxWx3) against its source."""
        keep = ~np.asarray(inpaint, dtype=bool)
        errors = preserved_region_errors(source, generated, keep)
        row: dict[str, float] = {
            "psnr": errors.psnr,
            "psnr_official": errors.psnr_official,
            "mse": errors.mse,
            "mse_official": errors.mse_official,
        }
        if self.lpips is not None:
            row["lpips"] = self.lpips(source, generated, keep)
        image = PIL.Image.fromarray(generated)
        for name, scorer in self.scorers.items():
            row[name] = float(scorer([image], [caption])[0])
        return row


def load_generated(path: Path, item: BenchmarkItem) -> np.ndarray:
    try:
        with PIL.Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError as e:
        raise BenchmarkError(f"entry {item.id!r}: generated image {str(path)!r} does not exist") from e
    if rgb.size != (BENCH_SIZE, BENCH_SIZE):  # official: Image.open(tgt).resize((512, 512))
        rgb = rgb.resize((BENCH_SIZE, BENCH_SIZE), PIL.Image.BICUBIC)
    return np.asarray(rgb).copy()


def score_folder(
    items: Sequence[BenchmarkItem],
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    evaluator: Evaluator,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per item: ``id``, ``image``, ``caption`` and every available metric."""
    rows = []
    for item in items:
        if progress:
            progress(f"scoring {item.id}")
        generated = load_generated(output_paths(out_dir, item)[0], item)
        scores = evaluator.score(load_source(root, item), generated, item.inpaint_mask(), item.caption)
        rows.append({"id": item.id, "image": item.image, "caption": item.caption, **scores})
    return rows


def mean_finite(values: Sequence[float]) -> float:
    """Mean over finite values (``inf`` PSNR of an identical region and ``nan`` are left out); nan if none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class SubsetResult:
    metrics: dict[str, float]  # mean of each available metric
    rows: list[dict[str, Any]]
    images: list[PIL.Image.Image]  # the generated images, for logging


def evaluate_subset(
    pipe: Any,
    items: Sequence[BenchmarkItem],
    root: str | os.PathLike,
    settings: GenerationSettings,
    evaluator: Evaluator,
) -> SubsetResult:
    """Generate ``items`` in memory with ``pipe`` and score them; the trainer's periodic evaluation."""
    rows, images = [], []
    for item in items:
        source = load_source(root, item)
        image = inpaint_item(pipe, item, source, settings).convert("RGB")
        scores = evaluator.score(source, np.asarray(image), item.inpaint_mask(), item.caption)
        rows.append({"id": item.id, **scores})
        images.append(image)
    metrics = {m: mean_finite([r[m] for r in rows]) for m in evaluator.columns}
    return SubsetResult(metrics=metrics, rows=rows, images=images)
