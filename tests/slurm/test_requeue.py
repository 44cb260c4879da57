"""Preemption on the real cluster with a toy Lightning trainer behind slurm/train.sh.

SIGUSR1 to the tasks (what ``--signal=SIGUSR1@90`` does before the time limit) -> ``SlurmRequeue`` saves
an hpc checkpoint at the end of the step and requeues the job -> train.sh restarts with the same run dir
and ``--ckpt_path auto`` -> the run resumes and ends with the same step and weights as an uninterrupted one. The real trainer's version of
this test is in test_train_job.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.slurm.conftest import REPO, TERMINAL, SlurmCluster, python_stub

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU = ("--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1")
STEPS = 20


def submit_toy(slurm: SlurmCluster, tmp_path: Path, name: str) -> tuple[str, Path, Path]:
    stub = python_stub(tmp_path, Path(__file__).with_name("toy_trainer.py"))
    run_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    env = slurm.env(PYTHON=str(stub), RUN_DIR=str(run_dir), EXTRA_ARGS=f"--trainer.max_steps={STEPS}")
    job = slurm.sbatch(*CPU, "--time=10", f"--output={log}", str(REPO / "slurm" / "train.sh"), env=env)
    return job, run_dir, log


def wait_for_step(slurm: SlurmCluster, job: str, run_dir: Path, step: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    progress = run_dir / "progress.txt"
    while time.monotonic() < deadline:
        if progress.is_file() and (text := progress.read_text()) and int(text) >= step:
            return int(text)
        if slurm.state(job) in TERMINAL:
            pytest.fail(f"job {job} ended before training step {step}")
        time.sleep(0.2)
    pytest.fail(f"no training step >= {step} in {run_dir} after {timeout:.0f} s")


def test_usr1_saves_requeues_and_resumes_to_identical_weights(slurm, tmp_path):
    job, run_dir, log = submit_toy(slurm, tmp_path, "interrupted")
    ref_job, ref_dir, ref_log = submit_toy(slurm, tmp_path, "reference")

    at = wait_for_step(slurm, job, run_dir, 4, timeout=180)
    assert at < STEPS
    slurm.run("scancel", "--signal=USR1", job)  # the tasks get it, not the batch shell (no --batch)

    (info,) = slurm.wait(job, timeout=300)
    (ref_info,) = slurm.wait(ref_job, timeout=300)
    assert info["JobState"] == "COMPLETED", log.read_text()
    assert ref_info["JobState"] == "COMPLETED", ref_log.read_text()
    assert info["Restarts"] == "1"
    assert ref_info["Restarts"] == "0"

    text = log.read_text()
    assert f"train.sh: job {job} restart 0" in text and f"train.sh: job {job} restart 1" in text
    assert "toy: world 2 resuming from None" in text  # first start: nothing to resume from
    saved = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"]
    assert at <= saved < STEPS
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'}" in text

    result, ref_result = (json.loads((d / "result.json").read_text()) for d in (run_dir, ref_dir))
    assert result["global_step"] == ref_result["global_step"] == STEPS
    weights, ref_weights = (torch.load(d / "final.pt") for d in (run_dir, ref_dir))
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
