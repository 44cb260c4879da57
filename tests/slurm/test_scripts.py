"""slurm/train.sh and slurm/check.sh on the local cluster, with a recording stand-in for the trainer.

The stand-in (PYTHON=<stub>) writes, per task, its argv, the rendezvous variables it got and what
Lightning's SLURMEnvironment makes of the task, so these tests check the launch itself: one task per
device, num_nodes/devices from the allocation, no leaked MASTER_ADDR/MASTER_PORT, per-job run directory.
"""

from __future__ import annotations

import json

import pytest

from tests.slurm.conftest import REPO, python_stub

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU = ("--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1")  # this node has no GPUs

RECORDER = """
import json, os, sys
from lightning.fabric.plugins.environments import SLURMEnvironment
env = SLURMEnvironment()
keys = ("MASTER_ADDR", "MASTER_PORT", "WANDB_RUN_ID", "WANDB_RESUME", "SLURM_CPUS_PER_TASK", "SLURM_JOB_NAME")
record = {
    "argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ.get(k) for k in keys},
    "detected": SLURMEnvironment.detect(), "world_size": env.world_size(), "global_rank": env.global_rank(),
    "local_rank": env.local_rank(), "node_rank": env.node_rank(), "main_port": env.main_port,
}
path = os.path.join(os.environ["RECORD_DIR"], f"rank-{os.environ['SLURM_PROCID']}.json")
with open(path, "w") as f:
    json.dump(record, f)
"""


def test_train_sh_one_task_per_device_matching_trainer_args(slurm, tmp_path):
    (tmp_path / "recorder.py").write_text(RECORDER)
    stub = python_stub(tmp_path, tmp_path / "recorder.py")
    records = tmp_path / "records"
    records.mkdir()
    submit_dir = tmp_path / "project"  # the job runs in the submit dir: RUN_DIR defaults under it
    submit_dir.mkdir()
    env = slurm.env(
        PYTHON=str(stub),
        RECORD_DIR=str(records),
        CONFIG="configs/tiny_cpu.yaml configs/fsdp_cpu.yaml",  # composed in order
        EXTRA_ARGS="--trainer.max_steps=3 --seed_everything=7",
        # a rendezvous of the submitting shell: must not reach the job
        MASTER_ADDR="203.0.113.7",
        MASTER_PORT="1",
    )
    env.pop("RUN_DIR", None)
    log = tmp_path / "job.out"
    out = slurm.run(
        "sbatch",
        "--parsable",
        *CPU,
        "--time=10",
        f"--output={log}",
        "--chdir",
        str(submit_dir),
        str(REPO / "slurm" / "train.sh"),
        "--data.batch_size=1",
        env=env,
    ).stdout
    job = out.strip().split(";")[0]
    slurm.jobs.append(job)
    (info,) = slurm.wait(job, timeout=90)
    assert info["JobState"] == "COMPLETED", log.read_text()

    run_dir = f"runs/brushnet-train-{job}"
    assert (submit_dir / run_dir).is_dir()
    ranks = [json.loads((records / f"rank-{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(ranks):
        assert rec["argv"] == [
            "fit", "--config", "configs/tiny_cpu.yaml", "--config", "configs/fsdp_cpu.yaml",
            "--trainer.num_nodes=1", "--trainer.devices=2",
            f"--trainer.default_root_dir={run_dir}", "--ckpt_path=auto",
            "--trainer.max_steps=3", "--seed_everything=7", "--data.batch_size=1",
        ]  # fmt: skip
        assert rec["cwd"] == str(submit_dir)
        assert rec["detected"], "Lightning does not detect Slurm (job name bash/interactive? no srun?)"
        assert (rec["world_size"], rec["global_rank"], rec["local_rank"], rec["node_rank"]) == (
            2,
            rank,
            rank,
            0,
        )
        assert rec["env"]["MASTER_ADDR"] is None
        assert rec["env"]["MASTER_PORT"] is None
        assert rec["main_port"] != 1  # Lightning derives it from the job id
        assert rec["env"]["SLURM_CPUS_PER_TASK"] == "1"
        assert rec["env"]["SLURM_JOB_NAME"] == "brushnet-train"
        assert rec["env"]["WANDB_RUN_ID"] == f"brushnet-train-{job}"
        assert rec["env"]["WANDB_RESUME"] == "allow"
    assert f"train.sh: job {job} restart 0" in log.read_text()


def test_check_sh_accepts_cpu_submission_and_rejects_gpus_here(slurm, tmp_path):
    train = str(REPO / "slurm" / "train.sh")
    check = str(REPO / "slurm" / "check.sh")
    ok = slurm.run(check, train, env=slurm.env(SBATCH_ARGS=" ".join(CPU)), check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith(f"ok   {train}: Job ") and "to start at" in ok.stdout

    gpu = slurm.run(check, train, env=slurm.env(), check=False)  # the script's 8 GPUs per node: none here
    assert gpu.returncode == 1
    assert f"FAIL {train}" in gpu.stdout and "gres" in gpu.stdout

    broken = tmp_path / "broken.sh"
    broken.write_text("#!/bin/bash\n#SBATCH --time=1\nif then fi\n")
    bad = slurm.run(check, str(broken), env=slurm.env(SBATCH_ARGS=" ".join(CPU)), check=False)
    assert bad.returncode == 1
    assert f"FAIL {broken}: syntax" in bad.stdout
