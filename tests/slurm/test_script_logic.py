"""The scripts' own logic without a cluster: fake Slurm variables, a recording PYTHON. Fast."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm.conftest import REPO

SLURM_DIR = REPO / "slurm"


def run_script(name: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"  # a PYTHON and an srun that only print their arguments
    bin_dir.mkdir(exist_ok=True)
    for tool in ("python", "srun"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool.upper()}: $*"\n')
        (bin_dir / tool).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    base.update(PYTHON=str(bin_dir / "python"), PATH=f"{bin_dir}:/usr/bin:/bin", **env)
    return subprocess.run(
        ["bash", str(SLURM_DIR / name), *args], env=base, cwd=tmp_path, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLURM_NTASKS": "3", "SLURM_NNODES": "2"}, "3 tasks do not split evenly over 2 nodes"),
        (
            {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "4"},
            "4 GPUs but 2 tasks per node: set --ntasks-per-node=4",
        ),
    ],
)
def test_train_sh_refuses_inconsistent_allocations(tmp_path, env, message):
    proc = run_script("train.sh", tmp_path, SLURM_JOB_ID="5", **env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "SRUN" not in proc.stdout


def test_train_sh_tasks_per_node_from_ntasks_when_not_given(tmp_path):
    proc = run_script(
        "train.sh",
        tmp_path,
        "--x=1",
        SLURM_JOB_ID="5",
        SLURM_NTASKS="8",
        SLURM_NNODES="2",
        SLURM_CPUS_PER_TASK="6",
    )
    assert proc.returncode == 0, proc.stderr
    srun = proc.stdout.split("SRUN: ")[1].strip()
    assert srun == (
        f"--kill-on-bad-exit=1 --cpus-per-task=6 {tmp_path}/bin/python -m train fit"
        " --config configs/sd15_segmentation_mask.yaml --trainer.num_nodes=2 --trainer.devices=4"
        " --trainer.default_root_dir=runs/brushnet-train-5 --ckpt_path=auto --x=1"
    )


def test_train_sh_refuses_to_run_outside_slurm(tmp_path):
    proc = run_script("train.sh", tmp_path)
    assert proc.returncode != 0
    assert "run this script with sbatch" in proc.stderr


@pytest.mark.parametrize("script", ["label.sh", "download.sh"])
@pytest.mark.parametrize(
    ("array", "expected"),
    [
        ({}, "--shard-index 0 --num-shards 1"),  # a plain job does everything
        (
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "8"},
            "3 --num-shards 8",
        ),
        (  # --array=1-8
            {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"},
            "--shard-index 7 --num-shards 8",
        ),
        (  # --array=0-14:2
            {
                "SLURM_ARRAY_TASK_ID": "6",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_COUNT": "8",
            },
            "--shard-index 3 --num-shards 8",
        ),
    ],
)
def test_data_scripts_map_array_task_to_shard_slice(tmp_path, script, array, expected):
    stage = script.removesuffix(".sh")
    proc = run_script(script, tmp_path, "--verbose", DATA_OUT="/data/run", DATA_CONFIG="c.yaml", **array)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.split("PYTHON: ")[1].strip()
    assert args.startswith(f"-m data_pipeline {stage} --shard-index ")
    assert expected in args
    assert args.endswith("--config c.yaml --out /data/run --verbose")


def test_cluster_fixture_skip_reasons(monkeypatch):
    from tests.slurm import conftest

    monkeypatch.setattr(conftest.sys, "platform", "linux")
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 1000)
    assert "needs root" in conftest._skip_reason()
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 0)
    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    monkeypatch.setattr(conftest, "Path", lambda *parts: Path("/nonexistent", *parts[1:]))
    assert "no apt-get" in conftest._skip_reason()
    monkeypatch.setattr(
        conftest.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "apt-get" else None
    )
    assert conftest._skip_reason() is None  # apt-get can install it
