"""``make bench`` / ``python -m train.tools.bench``: runs every part and writes a valid ``bench.json``; the
memory and FLOP counters it reports count what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.data.transforms import normalize_batch
from train.tools.bench.models import build_module, full_size_parts, make_batch
from train.tools.bench.step import LiveTensorBytes, step_flops

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")


def check_result(result: dict, configs: list[str]) -> None:
    assert result["machine"]["cpu_count"] >= 1 and result["wall_s"] > 0
    assert result["limits"]["matmul"]["float32"]["flops"] > 1e8
    assert result["limits"]["memory"]["bytes_per_s"] > 1e8
    for name in configs:
        entry = result["steps"][name]
        rows = entry["steps"]
        assert {(r["optimizer"], r["precision"], r["checkpointing"]) for r in rows} >= {
            ("adamw", p, c) for p in ("fp32", "bf16") for c in (False, True)
        }
        for r in rows:
            assert r["s_per_step"] > 0 and r["tflop_per_step"] > 0 and 0 < r["fraction_of_interleaved_mm"] < 5
            assert r["peak_tensor_gib"] > 0
        assert set(entry["optimizer_step"]) >= {"fused", "foreach", "for-loop"}
        assert entry["lightning"]["ratio"] > 0
    loaders = {(r["source"], r["loader"]) for r in result["loader"]}
    assert ("640x480", "official") in loaders and ("640x480", "ours_0w") in loaders
    ours = next(r for r in result["loader"] if r["loader"] == "ours_0w")
    assert ours["samples_per_s"] > 0 and ours["batch_mb"] < next(r["batch_mb"] for r in result["loader"])


def test_smoke_run_writes_bench_json_and_tables(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "train.tools.bench", "--smoke", "--skip", "pipeline", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    check_result(result, ["tiny"])
    (trainer,) = result["trainer_memory"]  # one brushnet-train process on the tiny shape
    row = trainer["variants"]["bf16, AdamW8bit"]
    assert 0.2 < row["peak_gib"] < 8 and row["last_step_s"] > 0 and row["steps"] == 3
    assert not out.with_name("bench.json.tmp").exists()
    for heading in (
        "| limit | measured |",
        "**Step, tiny**",
        "Lightning loop iteration",
        "**Trainer process, tiny**",
        "**Loader**",
    ):
        assert heading in done.stdout


@pytest.mark.slow
def test_make_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        ["make", "bench", "QUICK=1", f"BENCH_OUT={out}"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    check_result(result, ["tiny", "small"])
    assert {r["source"] for r in result["loader"]} == {"640x480", "1365x1024"}
    assert "shard_write" in result["pipeline"] and result["pipeline"]["label"]


def test_live_tensor_bytes_counts_storages_once_and_frees():
    base = torch.zeros(1000)  # 4000 bytes, tracked from the start
    with LiveTensorBytes([base, base[:10]]) as tracker:
        a = torch.ones(2000)  # +8000
        view = a[:100]  # same storage: nothing new
        del a, view
        b = torch.ones(500)  # +2000, after a was freed
    assert tracker.peak == 4000 + 8000
    assert tracker.current == 4000 + 2000
    del b


def test_step_flops_count_attention(tmp_path):
    """Plain-bmm attention makes FlopCounterMode see what CPU SDPA hides; a step is > forward alone."""
    module = build_module(tmp_path, "tiny")
    batch = make_batch(module, "tiny", torch.device("cpu"))
    flops = step_flops(module, batch)
    with FlopCounterMode(display=False) as sdpa:
        module.compute_loss(normalize_batch(batch), module.step_generator(0)).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        module.compute_loss(normalize_batch(batch), module.step_generator(0))
    assert flops > sdpa.get_total_flops() > forward.get_total_flops() > 0


@pytest.mark.parametrize(("name", "branch_params"), [("sd15", 618.83e6), ("sdxl", 373.33e6)])
def test_full_size_shapes_match_the_released_models(name, branch_params):
    """The --full shapes (on meta: no memory) give the official branch sizes (BrushNet paper / releases)."""
    from brushnet.model import BrushNetModel

    with torch.device("meta"):
        parts = full_size_parts(name)
        branch = BrushNetModel.from_unet(parts["unet"], load_weights_from_unet=False)
    assert sum(p.numel() for p in branch.parameters()) == pytest.approx(branch_params, rel=1e-4)
    assert sum(p.numel() for p in parts["unet"].parameters()) > 8e8


def test_trainer_memory_reports_each_switch_of_a_real_trainer_process(tmp_path):
    """``python -m train.tools.bench.trainer_memory``: one ``train fit`` process per switch; a switch that
    fails is reported with its error and the command exits 1."""
    out = tmp_path / "tm.json"
    cmd = [sys.executable, "-m", "train.tools.bench.trainer_memory", "--config", "tiny", "--out", str(out)]
    cmd += ["--variants", "fp32, AdamW", "bf16, checkpointing, AdamW8bit"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["variants"]
    assert list(rows) == ["fp32, AdamW", "bf16, checkpointing, AdamW8bit"]
    for r in rows.values():  # a Python process with torch and Lightning holds a few hundred MiB
        assert 0.2 < r["peak_gib"] < 8 and r["last_step_s"] > 0
    assert "| bf16, checkpointing, AdamW8bit |" in done.stdout and "| +0% |" in done.stdout


def test_a_trainer_process_that_fails_is_reported_with_its_error_line(tmp_path):
    from train.tools.bench.trainer_memory import markdown, measure

    row = measure(tmp_path / "no_base", tmp_path / "no_shards", 32, tmp_path, "fp32, AdamW", 1)
    assert row["error"].startswith("exit 2: ") and "no_base" in row["error"], row
    table = markdown({"config": "tiny", "size": 32, "variants": {"fp32, AdamW": row}})
    assert "| fp32, AdamW | failed: exit 2: " in table
