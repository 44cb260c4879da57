"""The real trainer behind slurm/train.sh on the local cluster: 2 CPU tasks (DDP over gloo), tiny random base.

(1) a job runs to completion and leaves checkpoints and an exported branch that loads;
(2) on 2 nodes x 1 task, SIGUSR1 mid-run (what ``--signal=SIGUSR1@90`` sends before the time limit):
    ``train.requeue`` saves an hpc checkpoint at the end of the current step and requeues, the job restarts
    with ``--ckpt_path auto`` and ends with the same step and bit-identical weights as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.slurm.conftest import REPO, SlurmCluster
from tests.train.data_builders import write_shards

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CPU = ("--gpus-per-node=0", "--cpus-per-task=1")  # the nodes have no GPUs
ONE_NODE = ("--nodes=1", "--ntasks-per-node=2")
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    write_shards(folder, [6, 6])  # 12 samples: 3 steps per epoch at 2 ranks x batch 2
    return folder


def overlay(tmp_path: Path, base: Path, shards: Path, max_steps: int, every: int) -> Path:
    """A config composed after configs/tiny_cpu.yaml: test data, few steps, checkpoints kept, no grids."""
    cfg = {
        "model": {"pretrained_model_name_or_path": str(base)},
        "data": {"train_shards": str(shards), "batch_size": 2, "num_workers": 0},
        "trainer": {
            "max_steps": max_steps,
            "logger": False,
            "callbacks": [
                {
                    "class_path": "train.checkpointing.BrushNetCheckpoint",
                    "init_args": {
                        "every_n_train_steps": every,
                        "save_top_k": -1,
                        "keep_exports": 100,
                        "monitor": "step",
                        "mode": "max",
                        "filename": "step-{step:08d}",
                    },
                }
            ],
        },
    }
    path = tmp_path / f"overlay-{max_steps}-{every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def submit(
    slurm: SlurmCluster, tmp_path: Path, name: str, config: Path, layout: tuple[str, ...] = ONE_NODE
) -> tuple[str, Path, Path]:
    run_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    env = slurm.env(CONFIG=f"configs/tiny_cpu.yaml {config}", RUN_DIR=str(run_dir))
    script = str(REPO / "slurm" / "train.sh")
    job = slurm.sbatch(*CPU, *layout, "--time=15", f"--output={log}", script, env=env)
    return job, run_dir, log


def checkpoints(run_dir: Path) -> dict[int, dict]:
    """The run's Lightning checkpoints by global step."""
    loaded = (
        torch.load(p, map_location="cpu", weights_only=False)
        for p in (run_dir / "checkpoints").glob("*.ckpt")
    )
    return {c["global_step"]: c for c in loaded}


def branch_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def final_export(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from brushnet import BrushNetModel

    folder = run_dir / "export" / f"step-{step:08d}" / "brushnet"
    assert folder.is_dir(), sorted(p.name for p in (run_dir / "export").iterdir())
    return BrushNetModel.from_pretrained(folder).state_dict()


def test_two_task_job_trains_and_exports(slurm, tmp_path, tiny_base_sd15, shards):
    job, run_dir, log = submit(slurm, tmp_path, "run", overlay(tmp_path, tiny_base_sd15, shards, 4, 2))
    (info,) = slurm.wait(job, timeout=480)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "MEMBER: 2/2" in text and "distributed_backend=gloo" in text  # really 2 DDP processes
    assert max(checkpoints(run_dir)) == 4
    weights = final_export(run_dir, 4)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_preempted_two_node_job_resumes_to_identical_weights(slurm, tmp_path, tiny_base_sd15, shards):
    """Both jobs run on 2 nodes x 1 task. (The same 2 ranks on 1 node x 2 tasks see the same batches, but
    gloo then reduces in another order: weights differ by about 4e-6 after 4 steps.)"""
    steps = 16
    config = overlay(tmp_path, tiny_base_sd15, shards, steps, 4)
    job, run_dir, log = submit(slurm, tmp_path, "interrupted", config, TWO_NODES)
    ref_job, ref_dir, ref_log = submit(slurm, tmp_path, "reference", config, TWO_NODES)

    slurm.wait_for_path(run_dir, "export/step-00000004", job, timeout=480)
    slurm.run("scancel", "--signal=USR1", job)  # to the tasks, like --signal=SIGUSR1@90

    (info,) = slurm.wait(job, timeout=600)
    (ref_info,) = slurm.wait(ref_job, timeout=600)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert ref_info["JobState"] == "COMPLETED", ref_log.read_text()
    assert (info["Restarts"], ref_info["Restarts"]) == ("1", "0")
    assert f"train.sh: job {job} restart 1" in text and "2 node(s) x 1 task(s)" in text
    assert "MEMBER: 2/2" in text  # Lightning's DDP over both nodes

    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved_step = torch.load(hpc, map_location="cpu", weights_only=False)["global_step"]
    assert 4 <= saved_step < steps, "the signal came too late to test a resume"
    assert f"Restoring states from the checkpoint path at {hpc}" in text

    ckpts, ref_ckpts = checkpoints(run_dir), checkpoints(ref_dir)
    assert max(ckpts) == max(ref_ckpts) == steps

    def branch(ckpt: dict) -> dict[str, torch.Tensor]:
        return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("brushnet.")}

    # identical before the signal (the runs are deterministic), so a difference at the end is the resume's
    assert not branch_differences(branch(ckpts[4]), branch(ref_ckpts[4])), (
        "the two runs differ before the signal"
    )
    different = branch_differences(final_export(run_dir, steps), final_export(ref_dir, steps))
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"
