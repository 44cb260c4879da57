"""``python -m train.tools.ablations`` (``make ablations``): the paper's ablations as a rerunnable study.

Every variant of ``configs/ablations/`` is trained with ``brushnet-train fit`` (as a subprocess, the way a user
runs it) for the same budget, on the same data, base and seeds, then evaluated on held-out photo crops with
known ground truth (:mod:`brushnet.testing.heldout`): PSNR / MSE inside the hole against the ground truth and
on the preserved region against the input (:func:`brushnet.evaluation.metrics.preserved_region_errors`, the
metric ``brushnet evaluate`` reports). The blending ablation needs no training: it re-runs the ``brushnet``
variant's branches with blurred blending, a hard paste and no blending. Results go to ``<out>/results.json``
(one record per variant and seed), ``<out>/ablations.md`` (mean ± std over seeds) and
``<out>/plots/<metric>.png``.

Resumable: a finished run leaves ``<run>/result.json`` and is skipped; a killed training run resumes from its
newest checkpoint (``--ckpt_path auto``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brushnet.atomic import atomic_write_text
from brushnet.evaluation.metrics import preserved_region_errors
from brushnet.evaluation.report import SUMMARY_CSV
from brushnet.testing.heldout import HeldOutCase, held_out_cases, inpaint_cases

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "ablations"
BASE_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
TRAINED = [
    "brushnet",
    "half_injection",
    "controlnet_injection",
    "conv_encoder",
    "cross_attention",
    "single_branch",
]
# The blending ablation re-runs the `brushnet` variant's branches: blurred blending (the default), a hard
# paste and no blending.
BLENDING = {
    "brushnet": {"blend": True, "blur_size": 21},
    "brushnet_paste": {"blend": True, "blur_size": 0},
    "brushnet_no_blend": {"blend": False, "blur_size": 21},
}
METRICS = ["hole_psnr", "hole_mse", "preserved_psnr", "preserved_mse", "seam_grad_mse"]
HIGHER_IS_BETTER = {m: m.endswith("psnr") for m in METRICS}
SEAM_WIDTH = 2  # px on each side of the hole's edge
PSNR_CAP = 60.0  # dB: an exactly preserved region (hard paste) has infinite PSNR; capped for means and plots
log = logging.getLogger("train.tools.ablations")


@dataclass
class Study:
    """Everything that decides a study's runs (see ``main``'s options)."""

    out: Path
    base: str
    data_args: list[str]
    variants: list[str] = field(default_factory=lambda: list(TRAINED))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300
    cases: int = 16
    eval_steps: int = 10
    config: Path = BASE_CONFIG
    train_args: list[str] = field(default_factory=list)
    benchmark: Path | None = None
    benchmark_limit: int | None = None
    benchmark_steps: int = 50


def train_variant(study: Study, variant: str, seed: int, run: Path) -> Path:
    """Train one variant and seed with ``brushnet-train fit``; the export folder of its last step."""
    cmd = [
        sys.executable,
        "-m",
        "train",
        "fit",
        "--config",
        str(study.config),
        "--config",
        str(CONFIGS / f"{variant}.yaml"),
        f"--seed_everything={seed}",  # also seeds the model's and the data's randomness (linked)
        f"--model.pretrained_model_name_or_path={study.base}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.max_steps={study.steps}",
        *study.data_args,
        *study.train_args,
        "--ckpt_path=auto",
    ]
    log.info("training %s seed %d: %s", variant, seed, " ".join(cmd))
    done = subprocess.run(cmd, cwd=run, check=False, capture_output=True, text=True)
    (run / "train.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"training {variant} seed {seed} failed (exit {done.returncode}): see {run / 'train.log'}"
        )
    export = final_export(run, study.steps)
    if export is None:
        raise RuntimeError(
            f"training {variant} seed {seed} wrote no export of step {study.steps} under {run}"
        )
    return export


def final_export(run: Path, steps: int) -> Path | None:
    """The export of the run's last step (written atomically: a folder there is complete), if any."""
    found = sorted(run.glob(f"**/export/step-{steps:08d}/brushnet"))
    return found[-1] if found else None


def _gradient_magnitude(rgb: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    gray = rgb.astype(np.float64).mean(axis=2) / 255.0
    return np.hypot(ndimage.sobel(gray, axis=0), ndimage.sobel(gray, axis=1))


def seam_gradient_error(output: np.ndarray, case: HeldOutCase) -> float:
    """Mean squared difference of Sobel gradient magnitudes (output vs ground truth) in a band of
    ``SEAM_WIDTH`` px on both sides of the hole's edge: what a visible seam adds, and what blending is for."""
    from scipy import ndimage

    band = ndimage.binary_dilation(case.hole, iterations=SEAM_WIDTH) & ~ndimage.binary_erosion(
        case.hole, iterations=SEAM_WIDTH
    )
    diff = _gradient_magnitude(output) - _gradient_magnitude(case.image)
    return float((diff[band] ** 2).mean())


def _psnr(mse: float) -> float:
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else 10 * math.log10(1 / mse)


def _scores(outputs: list[np.ndarray], cases: list[HeldOutCase]) -> dict[str, float]:
    hole = [preserved_region_errors(c.image, o, c.hole) for o, c in zip(outputs, cases)]
    kept = [preserved_region_errors(c.image, o, ~c.hole) for o, c in zip(outputs, cases)]
    hole_mse, kept_mse = float(np.mean([e.mse for e in hole])), float(np.mean([e.mse for e in kept]))
    return {
        "hole_psnr": _psnr(hole_mse),
        "hole_mse": hole_mse,
        "preserved_psnr": _psnr(kept_mse),
        "preserved_mse": kept_mse,
        "seam_grad_mse": float(np.mean([seam_gradient_error(o, c) for o, c in zip(outputs, cases)])),
    }


def _pipeline(variant: str, base: str, export: Path):
    if variant == "single_branch":
        from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(export)
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            base, unet=unet, safety_checker=None, requires_safety_checker=False
        )
    else:
        from brushnet.pipeline import BrushNetInpaintPipeline

        pipe = BrushNetInpaintPipeline.from_base(base, export)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint(variant: str, pipe, cases: list[HeldOutCase], steps: int, **options) -> list[np.ndarray]:
    """One output per case, seeded per case (the same seeds for every variant)."""
    if variant != "single_branch":
        scale = options.pop("brushnet_conditioning_scale", 1.0)
        return inpaint_cases(pipe, cases, conditioning_scale=scale, steps=steps, **options)
    from brushnet.single_branch import inpaint_single_branch

    return [
        inpaint_single_branch(
            pipe, c.caption, c.image, c.hole, steps=steps, guidance_scale=1.0, seed=i, **options
        )
        for i, c in enumerate(cases)
    ]


def evaluate_variant(variant: str, base: str, export: Path, cases: list[HeldOutCase], steps: int) -> dict:
    """Scores of one trained run. The ``brushnet`` variant also scores every blending mode and, as the
    reference, the base alone (conditioning scale 0: the frozen base with the same blending)."""
    pipe = _pipeline(variant, base, export)
    blur = BLENDING["brushnet"]
    with torch.no_grad():
        if variant != "brushnet":
            return {variant: _scores(inpaint(variant, pipe, cases, steps, **blur), cases)}
        scores = {
            name: _scores(inpaint(variant, pipe, cases, steps, **kw), cases) for name, kw in BLENDING.items()
        }
        base_alone = inpaint(variant, pipe, cases, steps, brushnet_conditioning_scale=0.0, **blur)
        scores["base_alone"] = _scores(base_alone, cases)
        return scores


def benchmark_scores(study: Study, export: Path, run: Path) -> dict[str, float]:
    """``brushnet evaluate`` on ``study.benchmark`` (BrushBench / EditBench layout) with blending; its summary
    means as ``bench_<metric>`` (only the metrics whose weights are available)."""
    script = Path(sys.executable).with_name("brushnet")  # the installed console script
    cmd = [str(script), "evaluate", "--benchmark", str(study.benchmark)]
    cmd += ["--out", str(run / "benchmark"), "--base", study.base, "--brushnet", str(export), "--blended"]
    cmd += [f"--steps={study.benchmark_steps}"]
    cmd += [f"--limit={study.benchmark_limit}"] if study.benchmark_limit else []
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"brushnet evaluate failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    with open(run / "benchmark" / SUMMARY_CSV, newline="", encoding="utf-8") as f:
        return {f"bench_{r['metric']}": float(r["mean"]) for r in csv.DictReader(f) if r["status"] == "ok"}


def summarise(records: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{variant: {metric: (mean, std, n)}}`` over seeds."""
    by_variant: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        for metric, value in rec["scores"].items():
            by_variant.setdefault(rec["variant"], {}).setdefault(metric, []).append(value)
    return {
        v: {
            m: (float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, len(x))
            for m, x in ms.items()
        }
        for v, ms in by_variant.items()
    }


def metric_names(summary: dict) -> list[str]:
    """The held-out metrics, then any ``bench_*`` metrics some variant has."""
    extra = sorted({m for metrics in summary.values() for m in metrics} - set(METRICS))
    return METRICS + extra


def markdown_table(summary: dict, budget: str) -> str:
    names = metric_names(summary)
    lines = [
        f"Budget: {budget}. Mean ± std over seeds; hole = inside the mask vs the ground truth, preserved = "
        f"outside the mask vs the input (PSNR capped at {PSNR_CAP:g} dB), seam = gradient error within "
        f"{SEAM_WIDTH} px of the hole's edge.",
        "",
        "| variant | seeds | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for variant, metrics in summary.items():
        n = next(iter(metrics.values()))[2]
        cells = [f"{metrics[m][0]:.4g} ± {metrics[m][1]:.2g}" if m in metrics else "-" for m in names]
        lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plots(summary: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in metric_names(summary):
        names = [v for v in summary if metric in summary[v]]
        means = [summary[v][metric][0] for v in names]
        stds = [summary[v][metric][1] for v in names]
        fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
        bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c78a8")
        ax.bar_label(bars, labels=[f"{m:.4g}" for m in means], fontsize=8, padding=2)
        low, high = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + 2 * pad)  # the differences, not the distance from zero
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        better = {True: " (higher is better)", False: " (lower is better)"}.get(
            HIGHER_IS_BETTER.get(metric), ""
        )
        ax.set_title(metric + better)
        fig.tight_layout()
        path = folder / f"{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def run_study(study: Study) -> dict:
    """Train and evaluate every (variant, seed) not done yet; write the results, table and plots."""
    held_out = held_out_cases(n=study.cases)
    records = []
    for variant in study.variants:
        for seed in study.seeds:
            run = study.out / variant / f"seed-{seed}"
            done = run / "result.json"
            if done.is_file():
                recs = json.loads(done.read_text())
                if all(set(METRICS) <= set(r["scores"]) for r in recs):
                    records += recs
                    continue
            run.mkdir(parents=True, exist_ok=True)
            # trained before (a rerun after a metric was added evaluates again) or trained now
            export = final_export(run, study.steps) or train_variant(study, variant, seed, run)
            scores = evaluate_variant(variant, study.base, export, held_out, study.eval_steps)
            if study.benchmark is not None and variant != "single_branch":  # needs a BrushNet branch
                scores[variant].update(benchmark_scores(study, export, run))
            recs = [
                {"variant": v, "seed": seed, "trained_as": variant, "scores": s} for v, s in scores.items()
            ]
            atomic_write_text(done, json.dumps(recs, indent=2))
            records += recs
            log.info("%s seed %d: %s", variant, seed, scores)
    summary = summarise(records)
    budget = (
        f"{study.steps} steps per run ({study.config.name}), {len(held_out)} held-out cases, "
        f"{study.eval_steps} sampling steps"
    )
    out = study.out
    atomic_write_text(out / "results.json", json.dumps({"budget": budget, "records": records}, indent=2))
    atomic_write_text(out / "ablations.md", markdown_table(summary, budget))
    bar_plots(summary, out / "plots")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.tools.ablations", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"), help="study folder (resumable)")
    parser.add_argument(
        "--base", default=None, help="base model folder (default: the shipped tiny photo base)"
    )
    parser.add_argument("--index", default=None, help="BrushData index.json (default: build the demo data)")
    parser.add_argument("--variants", default=",".join(TRAINED), help=f"comma-separated, from {TRAINED}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--cases", type=int, default=16, help="held-out evaluation cases")
    parser.add_argument("--eval-steps", type=int, default=10, help="sampling steps per inpainting")
    parser.add_argument("--config", type=Path, default=BASE_CONFIG, help="base training config")
    parser.add_argument("--train-args", default="", help="more brushnet-train fit arguments (word-split)")
    parser.add_argument("--benchmark", type=Path, default=None, help="also run brushnet evaluate on it")
    parser.add_argument("--benchmark-limit", type=int, default=None, help="its first N entries only")
    parser.add_argument("--benchmark-steps", type=int, default=50, help="its sampling steps (official: 50)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    unknown = sorted(set(args.variants.split(",")) - set(TRAINED))
    if unknown:
        print(f"error: unknown variants {unknown}; expected some of {TRAINED}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.base is None:
        from brushnet.testing.tiny_base import pretrained_tiny_base

        args.base = str(pretrained_tiny_base())
    if args.index:
        data_args = ["--data.index", str(Path(args.index).resolve())]
    else:
        from train.tools.demo_data import build_data

        data_args = build_data(out / "data")
    if "--data.index" in data_args:
        data_args.append("--data.train_shards=null")  # the base config may name a shard folder
    study = Study(
        out=out,
        base=args.base,
        data_args=data_args,
        variants=args.variants.split(","),
        seeds=[int(s) for s in args.seeds.split(",")],
        steps=args.steps,
        cases=args.cases,
        eval_steps=args.eval_steps,
        config=args.config.resolve(),
        train_args=shlex.split(args.train_args),
        benchmark=args.benchmark.resolve() if args.benchmark else None,
        benchmark_limit=args.benchmark_limit,
        benchmark_steps=args.benchmark_steps,
    )
    summary = run_study(study)
    print((out / "ablations.md").read_text())
    print(f"results: {out / 'results.json'}; plots: {out / 'plots'}; variants: {list(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
