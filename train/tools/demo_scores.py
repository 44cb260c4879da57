"""``make demo``'s measured result: the held-out and training-photo hole scores of the trained branch against the
base alone, the untrained branch and fills without a model, and the comparison figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def evaluate_run(
    run: Path, base: str, export: Path, cases: int, steps: int, resolution: int, samples: int = 1
) -> dict:
    """Hole (and kept-region) scores of the trained branch (and EMA) vs base alone and the untrained branch:
    on crops of the held-out photos (the test of generalisation), and on new crops and holes of the training
    photos (what the branch does where the tiny base knows what to draw). Next to them, the scores of two
    fills without a model (:func:`~brushnet.testing.heldout.classical_fills`) and, with ``samples`` > 1, of the
    average of that many samples per case."""
    from brushnet.atomic import atomic_write_text, save_image_atomic
    from brushnet.testing.heldout import (
        classical_fills,
        compare_branches,
        held_out_cases,
        hole_scores,
        untrained_branch,
    )
    from brushnet.testing.photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS

    branches = {"trained branch": export / "brushnet"}
    if (export / "brushnet_ema").is_dir():
        branches["trained branch (EMA)"] = export / "brushnet_ema"
    branches["untrained branch"] = untrained_branch(base)
    held_out = held_out_cases(n=cases, size=resolution)
    held_out_outputs: dict[str, list[np.ndarray]] = {}
    scores = compare_branches(
        base, branches, held_out, steps=steps, outputs=held_out_outputs, samples=samples
    )
    # the photos the data set was cut from, other random crops and holes (seed 1)
    seen = held_out_cases(n=cases, size=resolution, seed=1, photos=TRAIN_PHOTOS)
    seen_outputs: dict[str, list[np.ndarray]] = {}
    trained = {"trained branch": export / "brushnet"}
    seen_scores = compare_branches(base, trained, seen, steps=steps, outputs=seen_outputs, samples=samples)
    figure = comparison_figure(
        [("held-out", held_out, held_out_outputs), ("training photo", seen, seen_outputs)]
    )
    save_image_atomic(figure, run / "comparison.png")
    results = {
        "export": str(export),
        "held_out_photos": list(HELD_OUT_PHOTOS),
        "cases": cases,
        "resolution": resolution,
        "inference_steps": steps,
        "scores": scores,
        "psnr_gain_db_vs_base_alone": scores["trained branch"]["psnr_db"] - scores["base alone"]["psnr_db"],
        "psnr_gain_db_vs_untrained": scores["trained branch"]["psnr_db"]
        - scores["untrained branch"]["psnr_db"],
        "training_photos_scores": seen_scores,
        "training_photos_psnr_gain_db_vs_base_alone": seen_scores["trained branch"]["psnr_db"]
        - seen_scores["base alone"]["psnr_db"],
        "samples_per_case": samples,
        "classical_fills": {
            group: {name: hole_scores(images, group_cases)["psnr_db"] for name, images in fills.items()}
            for group, group_cases in (("held_out", held_out), ("training_photos", seen))
            for fills in [classical_fills(group_cases)]
        },
    }
    atomic_write_text(run / "results.json", json.dumps(results, indent=2) + "\n")
    return results


COMPARISON = ("masked input", "base alone", "trained branch", "ground truth")


def comparison_figure(sets: list[tuple[str, list, dict[str, list[np.ndarray]]]], per_set: int = 4):
    """``<run>/comparison.png``: for the first ``per_set`` cases of each (name, cases, outputs) set, the masked
    input, the base alone and the trained branch (both blended as the pipeline blends) and the ground truth."""
    from brushnet.masks import blurred_blend
    from train.validation import labelled_panels

    rows, footers = [], []
    for name, cases, outputs in sets:
        for i, case in enumerate(cases[:per_set]):
            masked = case.image * (~case.hole)[..., None].astype(np.uint8)
            fills = [blurred_blend(case.image, outputs[v][i], case.hole) for v in COMPARISON[1:3]]
            rows.append([masked, *fills, case.image])
            footers.append(f"{name}: {case.caption}")
    return labelled_panels(rows, COMPARISON, footers, min_panel=128)


def reference_line(results: dict) -> str:
    """The fills without a model (and the averaged samples, when scored) next to which to read the numbers."""
    fills = results["classical_fills"]
    parts = [
        f"{group.replace('_', ' ')}: " + ", ".join(f"{name} {db:.2f} dB" for name, db in fills[group].items())
        for group in ("held_out", "training_photos")
    ]
    line = "hole PSNR of fills without a model, " + "; ".join(parts)
    k = results.get("samples_per_case", 1)
    if k > 1:
        held, seen = results["scores"]["trained branch"], results["training_photos_scores"]["trained branch"]
        line += (
            f"\ntrained branch, average of {k} samples per case (comparable with those fills): held-out "
            f"{held['mean_of_samples_psnr_db']:.2f} dB, training photos {seen['mean_of_samples_psnr_db']:.2f} dB"
        )
    return line
