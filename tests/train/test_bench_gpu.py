"""``python -m train.tools.bench.gpu``: the prepared CUDA checks run end to end (here on the CPU, tiny shape)
and report step times, MFU and the trainer's own run on the device."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.tools.bench.gpu import datasheet_peak

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")


def _run(tmp_path: Path, *extra: str, timeout: float = 600) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "-m", "train.tools.bench.gpu", "--configs", "tiny", "--batch", "2", "--steps", "1"]
    cmd += ["--trainer-steps", "3", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_gpu_checks_run_end_to_end_and_report_mfu_and_the_trainer(tmp_path):
    result, stdout = _run(tmp_path)
    rows = {(r["optimizer"], r["compiled"]): r for r in result["steps"]}
    assert set(rows) == {("adamw", False), ("adamw8bit", False)}
    for r in rows.values():
        assert r["s_per_step"] > 0 and math.isclose(r["samples_per_s"], 2 / r["s_per_step"])
        assert 0 < r["mfu_of_measured_mm"] < 1
    trainer = result["trainer"]
    assert trainer["steps"] == 3
    assert math.isfinite(trainer["first_loss"]) and math.isfinite(trainer["last_loss"])
    assert trainer["peak_gib"] > 0.2
    assert "| tiny | 2 | adamw8bit | False |" in stdout
    assert "brushnet-train fit on the device (tiny photo base, bf16-mixed, AdamW8bit, 3 steps)" in stdout


def test_datasheet_peaks_match_the_device_name():
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H200") == 989e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert datasheet_peak("Tesla V100-SXM2-32GB") is None


@pytest.mark.slow
def test_the_compiled_variant_runs(tmp_path):
    result, _ = _run(tmp_path, "--compile", timeout=1800)
    compiled = [r for r in result["steps"] if r["compiled"]]
    assert len(compiled) == 1 and compiled[0]["s_per_step"] > 0
    assert compiled[0]["warmup_s"] > max(r["warmup_s"] for r in result["steps"] if not r["compiled"])
