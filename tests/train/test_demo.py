"""``make demo`` (``python -m train.tools.demo``): run folders are never wiped, a bad base fails first, and on
the shipped generating base the trained branch beats the base alone on held-out photos; the commands it
prints (resume, inpaint) run as printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from brushnet.masks import blurred_blend
from brushnet.testing.heldout import HeldOutCase
from train.tools.demo import choose_run
from train.tools.demo_scores import comparison_figure
from train.validation import validation_grid

# Held-out masked-region PSNR gain of base + trained branch over the base alone (same pipeline and seeds,
# branch at scale 0), default 1,000 steps: see README "What the demo shows" for the measured numbers. The
# margins are about half the gains measured, so a trainer that stopped learning fails them.
MIN_GAIN_DB = 0.4
MIN_GAIN_DB_SDXL = 0.15  # measured +0.30 dB (its base alone is 1.5 dB better than the SD 1.5 one's)
MIN_KEPT_GAIN_DB = 1.0  # the output (before blending) reproduces the kept region the branch is shown
# On new crops of the training photos the average of 2 samples scored 17.15 dB in the hole, biharmonic
# interpolation 15.53 dB. On held-out photos the average (12.85 dB) is below interpolation (13.72 dB), so
# nothing is asserted there against it (README, "What the demo shows").


def _demo(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.tools.demo", *args], capture_output=True, text=True, timeout=timeout
    )


def test_bad_base_fails_before_touching_earlier_runs(tmp_path):
    earlier = tmp_path / "runs" / "001"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text("{}")
    done = _demo("--out", str(tmp_path), "--base", str(tmp_path / "no-such-base"), timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no-such-base" in errors[0], done.stderr[-2000:]
    assert (earlier / "results.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["001"]


def test_eval_samples_below_one_is_refused_before_anything_is_written(tmp_path):
    done = _demo("--out", str(tmp_path / "out"), "--eval-samples", "0", timeout=120)
    assert done.returncode == 2 and "--eval-samples must be at least 1, got 0" in done.stderr
    assert not (tmp_path / "out").exists()


def test_choose_run_resumes_the_unfinished_run_else_starts_the_next(tmp_path):
    assert choose_run(tmp_path) == tmp_path / "runs" / "001"
    (tmp_path / "runs" / "001").mkdir(parents=True)
    assert choose_run(tmp_path) == tmp_path / "runs" / "001"  # unfinished: resumed
    assert choose_run(tmp_path, new=True) == tmp_path / "runs" / "002"
    (tmp_path / "runs" / "001" / "results.json").write_text("{}")
    assert choose_run(tmp_path) == tmp_path / "runs" / "002"  # finished: a new folder
    assert choose_run(tmp_path, run=tmp_path / "mine") == (tmp_path / "mine").resolve()


def test_validation_grid_shows_five_labelled_upscaled_panels():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    hole = np.zeros((32, 32), np.uint8)
    hole[8:24, 8:24] = 255
    output = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    grid = np.asarray(validation_grid(image, PIL.Image.fromarray(hole), output, "a cat", step=150))
    scale, bar = 6, 18  # 32 px panels to >= 192 px, label bar above, caption bar below
    assert grid.shape == (32 * scale + 2 * bar, 5 * 32 * scale, 3)
    panels = grid[bar : bar + 32 * scale].reshape(32 * scale, 5, 32 * scale, 3).transpose(1, 0, 2, 3)
    nearest = np.asarray(image).repeat(scale, 0).repeat(scale, 1)
    assert np.array_equal(panels[4], nearest)  # ground truth, nearest-neighbour upscaled
    assert np.array_equal(panels[2], np.asarray(output).repeat(scale, 0).repeat(scale, 1))
    assert (panels[1][8 * scale : 24 * scale, 8 * scale : 24 * scale] == 255).all()  # the mask
    assert (grid[:bar] < 128).any() and (grid[-bar:] < 128).any()  # labels and caption are drawn


def test_comparison_figure_rows_are_cases_columns_base_alone_and_trained_blended():
    rng = np.random.default_rng(0)
    hole = np.zeros((32, 32), bool)
    hole[4:20, 10:30] = True
    cases = [
        HeldOutCase(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), hole, f"photo {i}") for i in range(5)
    ]
    outputs = {
        v: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in cases]
        for v in ("base alone", "trained branch")
    }
    figure = np.asarray(
        comparison_figure([("held-out", cases, outputs), ("training photo", cases[:2], outputs)])
    )
    scale, bar = 4, 18  # 32 px panels to >= 128 px; one label bar, a caption bar under every row
    rows = 4 + 2  # at most 4 cases per set
    assert figure.shape == (bar + rows * (32 * scale + bar), 4 * 32 * scale, 3)
    top = bar + 1 * (32 * scale + bar)  # the second row: held-out case 1
    panels = figure[top : top + 32 * scale].reshape(32 * scale, 4, 32 * scale, 3).transpose(1, 0, 2, 3)

    def up(a: np.ndarray) -> np.ndarray:
        return a.repeat(scale, 0).repeat(scale, 1)

    assert np.array_equal(panels[0], up(cases[1].image * (~hole)[..., None].astype(np.uint8)))
    assert np.array_equal(panels[1], up(blurred_blend(cases[1].image, outputs["base alone"][1], hole)))
    assert np.array_equal(panels[2], up(blurred_blend(cases[1].image, outputs["trained branch"][1], hole)))
    assert np.array_equal(panels[3], up(cases[1].image))
    caption = figure[top + 32 * scale : top + 32 * scale + bar]
    assert (caption < 128).any()  # "held-out: photo 1" is written under its row


def _printed_command(stdout: str, heading: str) -> str:
    lines = stdout.splitlines()
    return lines[lines.index(heading) + 1].strip()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # demo + inpaint + 100 more steps: 224 s measured on a shared 2-core machine
def test_demo_branch_beats_base_alone_on_held_out_photos_and_resumes(tmp_path):
    done = _demo("--out", str(tmp_path), "--eval-samples", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "001"
    results = json.loads((run / "results.json").read_text())
    scores = results["scores"]
    assert results["psnr_gain_db_vs_base_alone"] > MIN_GAIN_DB, scores
    assert scores["trained branch"]["mse"] < scores["base alone"]["mse"]
    kept_gain = scores["trained branch"]["kept_psnr_db"] - scores["base alone"]["kept_psnr_db"]
    assert kept_gain > MIN_KEPT_GAIN_DB, scores
    assert results["training_photos_psnr_gain_db_vs_base_alone"] > MIN_GAIN_DB, results
    # where the base knows the photos, the average of 2 samples beats interpolation without a model
    seen, fills = results["training_photos_scores"]["trained branch"], results["classical_fills"]
    assert seen["mean_of_samples_psnr_db"] > fills["training_photos"]["biharmonic"] + MIN_GAIN_DB, results
    assert "hole PSNR of fills without a model" in done.stdout
    # zero-initialised output convolutions: the untrained branch adds nothing to the base
    assert abs(scores["untrained branch"]["psnr_db"] - scores["base alone"]["psnr_db"]) < 0.05, scores
    assert "trained - base alone" in done.stdout
    grid = PIL.Image.open(next(run.glob("logs/*/validation/step-00001000/00.png")))
    assert grid.width >= 5 * 192  # five panels, upscaled
    # 4 held-out + 4 training-photo cases, 4 panels of 64 px upscaled to 128, label and caption bars
    assert PIL.Image.open(run / "comparison.png").size == (4 * 128, 18 + 8 * (128 + 18))
    assert f"comparison       : {run / 'comparison.png'}" in done.stdout

    inpaint = _printed_command(done.stdout, "inpaint a held-out crop (seconds):")
    start = time.perf_counter()
    ran = subprocess.run(inpaint, shell=True, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert time.perf_counter() - start < 120
    assert PIL.Image.open(run / "inpaint.png").size == (64, 64)

    resume = _printed_command(done.stdout, "train 100 more steps:")
    ran = subprocess.run(resume, shell=True, capture_output=True, text=True, timeout=1200)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "last.ckpt" in ran.stderr  # --ckpt_path auto found the demo's checkpoint
    assert (run / "export" / "step-00001100" / "brushnet").is_dir()
    assert Path(run / "results.json").is_file()  # earlier results are kept


def test_make_demo_refuses_an_unknown_family_in_one_line():
    done = subprocess.run(
        ["make", "--no-print-directory", "demo", "FAMILY=sd4"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "FAMILY=sd4: expected sdxl, sd3 or flux" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 1,000 steps + scoring: 130 s measured
def test_sdxl_demo_branch_beats_base_alone_on_held_out_photos(tmp_path):
    """``make demo FAMILY=sdxl``: the same training and scores on the SDXL-layout tiny base (two text
    encoders, pooled embeds and time ids through the branch), and the inpaint command it prints runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["make", "--no-print-directory", "demo", "FAMILY=sdxl", f"DEMO_ARGS=--out {tmp_path}"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "001" / "results.json").read_text())
    scores = results["scores"]
    assert "tiny_sdxl_photos" in done.stdout
    assert results["psnr_gain_db_vs_base_alone"] > MIN_GAIN_DB_SDXL, scores
    kept_gain = scores["trained branch"]["kept_psnr_db"] - scores["base alone"]["kept_psnr_db"]
    assert kept_gain > MIN_KEPT_GAIN_DB, scores
    assert results["training_photos_psnr_gain_db_vs_base_alone"] > MIN_GAIN_DB, results
    assert abs(scores["untrained branch"]["psnr_db"] - scores["base alone"]["psnr_db"]) < 0.05, scores
    inpaint = _printed_command(done.stdout, "inpaint a held-out crop (seconds):")
    ran = subprocess.run(inpaint, shell=True, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert PIL.Image.open(tmp_path / "runs" / "001" / "inpaint.png").size == (64, 64)
