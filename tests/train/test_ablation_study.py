"""The ablation study: its config overlays, and the driver end to end on a 2-variant, few-step run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from brushnet.brushdata import write_index
from tests.brushnet.evaluation_builders import fake_benchmark
from tests.train.data_builders import write_shards
from tests.train.test_configs import CONFIGS, parse
from train.tools.ablations import METRICS, TRAINED


@pytest.mark.slow
def test_study_trains_evaluates_writes_table_and_plots_and_resumes(tiny_base_sd15, tmp_path):
    shards = write_shards(tmp_path / "data", [8])
    index = write_index(shards, tmp_path / "data" / "index.json")
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "train.tools.ablations",
        f"--out={out}",
        f"--base={tiny_base_sd15}",
        f"--index={tmp_path / 'data' / 'index.json'}",
        "--variants=brushnet,half_injection",
        "--seeds=0",
        "--steps=2",
        "--cases=2",
        "--eval-steps=2",
        f"--benchmark={fake_benchmark(tmp_path / 'bench', n=1)}",
        "--benchmark-steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert index  # the data the runs trained on
    results = json.loads((out / "results.json").read_text())
    variants = {r["variant"] for r in results["records"]}
    assert variants == {"brushnet", "brushnet_paste", "brushnet_no_blend", "base_alone", "half_injection"}
    for rec in results["records"]:
        bench = {"bench_psnr", "bench_mse"} if rec["variant"] in ("brushnet", "half_injection") else set()
        assert (
            set(METRICS) | bench
            <= set(rec["scores"])
            <= set(METRICS) | {m for m in rec["scores"] if m.startswith("bench_")}
        )
        assert all(rec["scores"].get(m, 1) > 0 for m in bench)
        assert 0 < rec["scores"]["hole_mse"] < 1 and rec["scores"]["seam_grad_mse"] > 0
    paste = next(r for r in results["records"] if r["variant"] == "brushnet_paste")["scores"]
    no_blend = next(r for r in results["records"] if r["variant"] == "brushnet_no_blend")["scores"]
    assert paste["preserved_mse"] == 0.0 and no_blend["preserved_mse"] > 0.0  # a hard paste keeps the input
    table = (out / "ablations.md").read_text()
    assert "| half_injection | 1 |" in table and "hole_psnr" in table
    plots = {p.name for p in (out / "plots").iterdir()}
    bench_plots = {f"bench_{m}.png" for m in ("psnr", "mse", "psnr_official", "mse_official")}
    assert plots == {f"{m}.png" for m in METRICS} | bench_plots
    assert (out / "half_injection" / "seed-0" / "result.json").is_file()

    # a rerun skips finished runs: no training subprocess, same records
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training brushnet seed 0" not in again.stderr
    assert json.loads((out / "results.json").read_text())["records"] == results["records"]

    # a run whose result lacks a metric (added later) is evaluated again from its export, not retrained
    done = out / "half_injection" / "seed-0" / "result.json"
    recs = json.loads(done.read_text())
    del recs[0]["scores"]["seam_grad_mse"]
    done.write_text(json.dumps(recs))
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "training half_injection" not in third.stderr and "half_injection seed 0:" in third.stderr
    assert json.loads((out / "results.json").read_text())["records"] == results["records"]


@pytest.mark.parametrize("variant", TRAINED)
@pytest.mark.parametrize("base", ["tiny_cpu.yaml", "sd15_segmentation_mask.yaml"])
def test_every_ablation_overlay_composes_and_changes_only_its_switches(variant, base):
    plain = parse(CONFIGS / base)
    cfg = parse(CONFIGS / base, CONFIGS / "ablations" / f"{variant}.yaml")
    overlay = yaml.safe_load((CONFIGS / "ablations" / f"{variant}.yaml").read_text())
    changed = {k for k in vars(cfg.model) if cfg.model[k] != plain.model[k]}
    assert changed <= set(overlay["model"]) and set(overlay) == {"model"}
    assert cfg.data == plain.data and cfg.trainer == plain.trainer
    switches = {"injection", "condition_encoder", "branch_cross_attention", "single_branch"}
    assert set(overlay["model"]) <= switches
