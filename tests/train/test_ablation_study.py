"""The ablation study driver end to end on a 2-variant, few-step configuration; resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from brushnet.brushdata import write_index
from tests.train.data_builders import write_shards


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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert index  # the data the runs trained on
    results = json.loads((out / "results.json").read_text())
    variants = {r["variant"] for r in results["records"]}
    assert variants == {"blend_blur", "blend_paste", "no_blend", "half_injection"}
    for rec in results["records"]:
        assert set(rec["scores"]) == {"hole_psnr", "hole_mse", "preserved_psnr", "preserved_mse"}
        assert 0 < rec["scores"]["hole_mse"] < 1
    paste = next(r for r in results["records"] if r["variant"] == "blend_paste")["scores"]
    no_blend = next(r for r in results["records"] if r["variant"] == "no_blend")["scores"]
    assert paste["preserved_mse"] == 0.0 and no_blend["preserved_mse"] > 0.0  # a hard paste keeps the input
    table = (out / "ablations.md").read_text()
    assert "| half_injection | 1 |" in table and "hole_psnr" in table
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        f"{m}.png" for m in ("hole_psnr", "hole_mse", "preserved_psnr", "preserved_mse")
    )
    assert (out / "half_injection" / "seed-0" / "result.json").is_file()

    # a rerun skips finished runs: no training subprocess, same records
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training brushnet seed 0" not in again.stderr
    assert json.loads((out / "results.json").read_text())["records"] == results["records"]
