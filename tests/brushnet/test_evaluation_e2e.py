"""End to end: tiny random base + branch on a 3-image fake BrushBench through `brushnet evaluate`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import yaml

from brushnet.evaluation import cli
from brushnet.evaluation.benchmark import (
    GenerationSettings,
    generate,
    load_mapping,
    load_source,
    output_paths,
)
from brushnet.evaluation.evaluate import METRICS, Evaluator, evaluate_subset, score_folder
from brushnet.evaluation.report import write_report
from brushnet.evaluation.scorers import LPIPSPaths, ModelPaths, load_model_paths
from brushnet.pipeline import BrushNetInpaintPipeline

from .branches import save_branch
from .evaluation_builders import fake_benchmark, tiny_metric_paths


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="brushnet")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base_sd15):
    root = tmp_path_factory.mktemp("eval")
    bench = fake_benchmark(root / "bench")
    branch = save_branch(tiny_base_sd15, root / "branch")
    metrics = root / "weights" / "metrics.yaml"
    metrics.parent.mkdir()
    metrics.write_text(yaml.safe_dump(tiny_metric_paths(metrics.parent)))
    return {"root": root, "bench": bench, "base": tiny_base_sd15, "branch": branch, "metrics": metrics}


def _argv(s: dict, out, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--benchmark",
        str(s["bench"]),
        "--out",
        str(out),
        "--base",
        str(s["base"]),
        "--brushnet",
        str(s["branch"]),
        "--steps",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.mark.slow
def test_evaluate_cli_end_to_end_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.run(_parse(_argv(setup, out, "--metrics-config", str(setup["metrics"]), "--blended"))) == 0
    items = load_mapping(setup["bench"] / "mapping_file.json")
    for item in items:
        generated, masked = output_paths(out, item)
        assert PIL.Image.open(generated).size == (512, 512)
        ys, xs = np.nonzero(item.inpaint_mask())
        inner = np.asarray(PIL.Image.open(masked))[ys.min() + 8 : ys.max() - 8, xs.min() + 8 : xs.max() - 8]
        assert inner.max() < 16  # the masked input is saved with a black hole (JPEG noise aside)
    with open(out / "evaluation_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["000", "001", "002"]
    assert {
        "psnr",
        "psnr_official",
        "mse_official",
        "lpips",
        "clip_similarity",
        "hps_v2.1",
        "aesthetic_score",
    } <= set(rows[0])
    # blended: the preserved region is the source up to JPEG noise
    assert all(float(r["psnr"]) > 25 for r in rows)
    with open(out / "evaluation_summary.csv") as f:
        summary = {r["metric"]: r for r in csv.DictReader(f)}
    assert summary["image_reward"]["status"].startswith("unavailable: no weights configured")
    assert summary["psnr"]["status"] == "ok" and int(summary["psnr"]["n"]) == 3
    mean = np.mean([float(r["psnr"]) for r in rows])
    assert float(summary["psnr"]["mean"]) == pytest.approx(mean, rel=1e-5)
    report = (out / "evaluation_report.md").read_text()
    assert "![lpips](grids/lpips.png)" in report
    assert "| ImageReward | unavailable: no weights configured (image_reward.checkpoint) |" in report
    # every metric that ran has its grid: 3 images -> 3 (masked input, result) pairs in each of 2 rows
    columns = [c for c in rows[0] if c not in ("id", "image", "caption")]
    for metric in columns:
        with PIL.Image.open(out / "grids" / f"{metric}.png") as grid:
            assert grid.size == (60 + 3 * 2 * 160, 2 * (160 + 16)), metric
    assert json.loads((out / "generation.json").read_text())["blended"] is True

    # second run: every image is skipped, nothing is regenerated
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("images/*")}
    capsys.readouterr()
    assert cli.run(_parse(_argv(setup, out, "--blended"))) == 0
    assert "generated 0, skipped 3" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("images/*")} == mtimes

    # other settings on the same folder are refused with a clear message
    assert cli.run(_parse(_argv(setup, out, "--no-blended"))) == 2
    assert "blended: stored True, now False" in capsys.readouterr().err


def test_generation_skips_done_images_and_resumes_the_rest(setup, tmp_path):
    items = load_mapping(setup["bench"] / "mapping_file.json", "outside")
    settings = GenerationSettings(base="b", brushnet="n", mask_kind="outside", steps=3, guidance=2.0, seed=7)
    calls = []

    def fake_pipe(prompt, image, mask, **kwargs):
        calls.append((prompt, np.asarray(mask) >= 128, kwargs))
        return SimpleNamespace(images=[PIL.Image.fromarray(255 - np.asarray(image))])

    out = tmp_path / "run"
    first = generate(fake_pipe, items[:1], setup["bench"], out, settings)
    assert (first.generated, first.skipped) == (1, 0)
    second = generate(fake_pipe, items[:2], setup["bench"], out, settings)
    assert (second.generated, second.skipped) == (1, 1)
    assert [c[0] for c in calls] == [items[0].caption, items[1].caption]
    assert np.array_equal(calls[1][1], items[1].inpaint_mask())  # white = inpaint, as the pipeline expects
    kwargs = calls[1][2]
    assert (kwargs["num_inference_steps"], kwargs["guidance_scale"], kwargs["blend"]) == (3, 2.0, False)
    assert kwargs["generator"].initial_seed() == 7
    assert kwargs["masked_image_encoding"] == "official"  # one VAE sample per CFG half, as the official
    # an interrupted write leaves no file under the final name: only complete images count as done
    output_paths(out, items[2])[0].parent.joinpath(".coffee.jpg.x.tmp").write_bytes(b"partial")
    assert generate(fake_pipe, items, setup["bench"], out, settings).generated == 1


def test_no_generate_scores_an_existing_folder_and_missing_images_are_named(setup, tmp_path, capsys):
    assert (
        cli.run(
            _parse(["evaluate", "--benchmark", str(setup["bench"]), "--out", str(tmp_path), "--no-generate"])
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "entry '000'" in err and "does not exist" in err
    assert cli.run(_parse(["evaluate", "--benchmark", str(setup["bench"]), "--out", str(tmp_path)])) == 2
    assert "--base and --brushnet are required" in capsys.readouterr().err
    argv = ["evaluate", "--benchmark", str(setup["bench"]), "--out", str(tmp_path), "--no-generate"]
    assert cli.run(_parse([*argv, "--limit", "0"])) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_no_generate_scores_another_methods_folder_without_masked_images(setup, tmp_path):
    """Results of another method hold only ``<image>`` files, no ``*_masked``: the installed ``brushnet
    evaluate --no-generate`` scores them, writes the CSVs, the report and the grids, and exits 0."""
    items = load_mapping(setup["bench"] / "mapping_file.json")
    out = tmp_path / "other-method"
    for i, item in enumerate(items):
        path = output_paths(out, item)[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        blurred = PIL.Image.fromarray(load_source(setup["bench"], item)).filter(
            PIL.ImageFilter.GaussianBlur(i + 1)
        )
        blurred.save(path, quality=95)
    script = Path(sys.executable).with_name("brushnet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "brushnet.cli"]
    shipped = Path(__file__).parents[2] / "configs" / "eval" / "metrics.yaml"
    argv = ["evaluate", "--benchmark", str(setup["bench"]), "--out", str(out), "--no-generate"]
    proc = subprocess.run(
        [*cmd, *argv, "--metrics-config", str(shipped), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'evaluation_summary.csv'}" in proc.stdout
    assert not list(out.rglob("*_masked*"))
    with open(out / "evaluation_per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["000", "001", "002"]
    assert all(15 < float(r["psnr"]) < 60 for r in rows)  # blurred, not identical
    best = items[max(range(3), key=lambda i: float(rows[i]["psnr"]))]
    with open(out / "evaluation_summary.csv") as f:
        summary = {r["metric"]: r for r in csv.DictReader(f)}
    assert "/models/clip-vit-large-patch14" in summary["clip_similarity"]["status"]  # the shipped config
    # the best PSNR cell shows the source with its hole blacked out (made from the benchmark), then the result
    with PIL.Image.open(out / "grids" / "psnr.png") as grid:
        cells = np.asarray(grid.convert("RGB"))
    masked = load_source(setup["bench"], best) * (~best.inpaint_mask())[..., None].astype(np.uint8)
    for x, image in ((60, PIL.Image.fromarray(masked)), (220, PIL.Image.open(output_paths(out, best)[0]))):
        thumb = np.asarray(image.convert("RGB").resize((160, 160), PIL.Image.BICUBIC))
        assert np.array_equal(cells[16 : 16 + 160, x : x + 160], thumb)


def test_evaluate_help_names_every_metric():
    script = Path(sys.executable).with_name("brushnet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "brushnet.cli"]
    proc = subprocess.run(
        [*cmd, "evaluate", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for name, info in METRICS.items():
        assert f"{name:<16} {info.label}" in proc.stdout
    assert "section 'clip'" in proc.stdout and "configs/eval/metrics.yaml" in proc.stdout


def test_evaluate_subset_for_training(setup):
    items = load_mapping(setup["bench"] / "mapping_file.json")[:1]
    pipe = BrushNetInpaintPipeline.from_base(setup["base"], setup["branch"])
    pipe.set_progress_bar_config(disable=True)
    evaluator = Evaluator.from_paths(load_model_paths(setup["metrics"]), only=["clip_similarity", "lpips"])
    settings = GenerationSettings(base="b", brushnet="n", steps=1, guidance=1.0, blended=True)
    result = evaluate_subset(pipe, items, setup["bench"], settings, evaluator)
    assert list(result.metrics) == [
        "psnr",
        "psnr_official",
        "lpips",
        "mse",
        "mse_official",
        "clip_similarity",
    ]
    assert all(np.isfinite(v) for v in result.metrics.values())
    assert result.metrics["clip_similarity"] == result.rows[0]["clip_similarity"] >= 0
    assert result.metrics["psnr"] == pytest.approx(np.mean([r["psnr"] for r in result.rows]))
    assert len(result.images) == 1 and result.images[0].size == (512, 512)
    # the same seed gives the same images
    again = evaluate_subset(
        pipe, items, setup["bench"], settings, Evaluator.from_paths(ModelPaths(), only=[])
    )
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_report_outputs_from_a_scored_folder(setup, tmp_path):
    items = load_mapping(setup["bench"] / "mapping_file.json")

    def blur_pipe(prompt, image, mask, **kwargs):  # changes the whole image, more for longer prompts
        radius = len(prompt) % 5 + 1
        return SimpleNamespace(
            images=[PIL.Image.fromarray(image).filter(PIL.ImageFilter.GaussianBlur(radius))]
        )

    out = tmp_path / "run"
    generate(blur_pipe, items, setup["bench"], out, GenerationSettings(base="b", brushnet="n"))
    evaluator = Evaluator.from_paths(ModelPaths(lpips=LPIPSPaths(backbone=str(tmp_path / "no-backbone.pth"))))
    rows = score_folder(items, setup["bench"], out, evaluator)
    paths = write_report(
        out, rows, evaluator.columns, evaluator.unavailable, items, setup["bench"], {"steps": 50}
    )
    with open(paths["per_image"]) as f:
        per_image = list(csv.DictReader(f))
    assert [r["id"] for r in per_image] == ["000", "001", "002"]
    assert [float(r["mse"]) for r in per_image] == [r["mse"] for r in rows]  # full precision
    with open(paths["summary"]) as f:
        summary = {r["metric"]: r for r in csv.DictReader(f)}
    assert "no-backbone.pth" in summary["lpips"]["status"]
    assert summary["clip_similarity"]["status"] == "unavailable: no weights configured (clip.path)"
    psnr = [r["psnr"] for r in rows]
    assert float(summary["psnr"]["mean"]) == pytest.approx(np.mean(psnr))
    assert float(summary["psnr_official"]["mean"]) == pytest.approx(np.mean(psnr) - 10 * np.log10(3))
    grid = PIL.Image.open(paths["grid_psnr"])
    assert grid.size == (60 + 3 * 2 * 160, 2 * (160 + 16))
    report = paths["report"].read_text()
    assert "![psnr](grids/psnr.png)" in report and "`steps=50`" in report and "no-backbone.pth" in report
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries
