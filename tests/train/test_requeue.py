"""The small parts of ``train.requeue``; the signal -> save -> requeue -> resume path is tested end to end in
``test_resume.py`` (fake Slurm environment) and ``tests/slurm/test_train_job.py`` (real cluster)."""

from __future__ import annotations

import signal

import pytest

from train.requeue import SlurmRequeue, hpc_checkpoints, signal_number, slurm_job_id


def test_signal_names():
    assert signal_number("SIGUSR1") is signal.SIGUSR1 and signal_number("USR2") is signal.SIGUSR2
    with pytest.raises(ValueError, match=r"signal='SIGFOO'.*SIGUSR1"):
        SlurmRequeue(signal="SIGFOO")


def test_job_id_of_plain_and_array_jobs(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert slurm_job_id() == "1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "1200_7"  # what scontrol requeue takes for one array task


def test_hpc_checkpoints_sorted_by_number(tmp_path):
    for name in (
        "hpc_ckpt_10.ckpt",
        "hpc_ckpt_9.ckpt",
        "hpc_ckpt_x.ckpt",
        "hpc_ckpt_2.ckpt.tmp",
        "last.ckpt",
    ):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in hpc_checkpoints(tmp_path)] == ["hpc_ckpt_9.ckpt", "hpc_ckpt_10.ckpt"]
