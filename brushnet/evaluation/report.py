"""Evaluation outputs: per-image CSV, summary CSV, markdown report and best/worst PNG grids per metric."""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw

from brushnet.evaluation.benchmark import BenchmarkItem, output_paths
from brushnet.evaluation.evaluate import METRICS, mean_finite

PER_IMAGE_CSV = "evaluation_per_image.csv"
SUMMARY_CSV = "evaluation_summary.csv"
REPORT_MD = "evaluation_report.md"
THUMB = 160


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.6g}")
    return str(value)


def summarize(rows: Sequence[dict], columns: Sequence[str], unavailable: dict[str, str]) -> list[dict]:
    """One summary row per metric: mean/std over finite values, how many were left out, or why unavailable."""
    out = []
    for m in METRICS:
        info = METRICS[m]
        base = {"metric": m, "label": info.label, "higher_is_better": info.higher_is_better}
        if m in columns:
            values = [float(r[m]) for r in rows]
            finite = [v for v in values if math.isfinite(v)]
            out.append(
                {
                    **base,
                    "status": "ok",
                    "mean": mean_finite(values),
                    "std": statistics.pstdev(finite) if finite else math.nan,
                    "n": len(finite),
                    "n_not_finite": len(values) - len(finite),
                }
            )
        elif m in unavailable:
            out.append(
                {
                    **base,
                    "status": f"unavailable: {unavailable[m]}",
                    "mean": math.nan,
                    "std": math.nan,
                    "n": 0,
                    "n_not_finite": 0,
                }
            )
    return out


def write_csv(path: Path, rows: Sequence[dict], fieldnames: Sequence[str]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)  # floats in full precision; nan / inf spelled out

    _atomic_write(path, write)


def _thumb(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as im:
        return im.convert("RGB").resize((THUMB, THUMB), PIL.Image.BICUBIC)


def metric_grid(
    metric: str, rows: Sequence[dict], items: dict[str, BenchmarkItem], out_dir: Path, k: int = 4
) -> PIL.Image.Image | None:
    """Rows "best" and "worst": ``k`` (masked input, generated) pairs each, labelled with id and value."""
    ranked = sorted((r for r in rows if math.isfinite(float(r[metric]))), key=lambda r: float(r[metric]))
    if not ranked:
        return None
    if METRICS[metric].higher_is_better:
        ranked.reverse()
    k = min(k, len(ranked))
    groups = [("best", ranked[:k]), ("worst", ranked[::-1][:k])]
    label_h = 16
    cell_w, cell_h = 2 * THUMB, THUMB + label_h
    grid = PIL.Image.new("RGB", (60 + k * cell_w, 2 * cell_h), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for gi, (name, group) in enumerate(groups):
        y = gi * cell_h
        draw.text((4, y + cell_h // 2), name, fill="black")
        for ci, row in enumerate(group):
            generated, masked = output_paths(out_dir, items[row["id"]])
            x = 60 + ci * cell_w
            grid.paste(_thumb(masked), (x, y + label_h))
            grid.paste(_thumb(generated), (x + THUMB, y + label_h))
            draw.text((x + 2, y + 2), f"{row['id']}: {_fmt(float(row[metric]))}", fill="black")
    return grid


def write_report(
    out_dir: str | os.PathLike,
    rows: Sequence[dict],
    columns: Sequence[str],
    unavailable: dict[str, str],
    items: Sequence[BenchmarkItem],
    settings: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the CSVs, the grids (``grids/<metric>.png``) and the markdown report; returns their paths."""
    out_dir = Path(out_dir)
    by_id = {it.id: it for it in items}
    paths = {
        "per_image": out_dir / PER_IMAGE_CSV,
        "summary": out_dir / SUMMARY_CSV,
        "report": out_dir / REPORT_MD,
    }
    write_csv(paths["per_image"], rows, ["id", "image", "caption", *columns])
    summary = summarize(rows, columns, unavailable)
    write_csv(
        paths["summary"],
        summary,
        ["metric", "label", "status", "mean", "std", "n", "n_not_finite", "higher_is_better"],
    )
    grid_dir = out_dir / "grids"
    grid_dir.mkdir(exist_ok=True)
    lines = ["# BrushNet evaluation", "", f"{len(rows)} images."]
    if settings:
        lines += ["", "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items())]
    lines += ["", "| metric | mean | std | n | not finite | better |", "|---|---|---|---|---|---|"]
    for s in summary:
        if s["status"] == "ok":
            better = "higher" if s["higher_is_better"] else "lower"
            lines.append(
                f"| {s['label']} | {_fmt(s['mean'])} | {_fmt(s['std'])} | {s['n']} | "
                f"{s['n_not_finite']} | {better} |"
            )
        else:
            lines.append(f"| {s['label']} | {s['status']} | | | | |")
    lines += [
        "",
        "PSNR/MSE/LPIPS are computed on the preserved (not inpainted) region. The *official* columns use",
        "the formula of the official evaluate_brushnet.py (3-channel sum over a 1-channel pixel count:",
        "MSE x3, PSNR -4.77 dB, PSNR capped at 1000 for identical regions); the per-channel ones are the",
        "standard definitions (PSNR inf for identical regions, left out of the mean and counted as not finite).",
        "An image whose mask covers everything has no preserved region: its PSNR/MSE/LPIPS are nan.",
        "",
    ]
    for m in columns:
        grid = metric_grid(m, rows, by_id, out_dir)
        if grid is None:
            continue
        grid_path = grid_dir / f"{m}.png"
        _atomic_write(grid_path, lambda tmp, g=grid: g.save(tmp, format="PNG"))
        paths[f"grid_{m}"] = grid_path
        lines += [
            f"## {METRICS[m].label}",
            "",
            "Best and worst (masked input, result):",
            "",
            f"![{m}](grids/{m}.png)",
            "",
        ]
    _atomic_write(paths["report"], lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))
    return paths
