"""Exact resume after a real SIGKILL, and DDP on 2 CPU processes (gloo), through ``python -m train``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from brushnet.model import BrushNetModel
from tests.train.cli_runs import cli_args, overlay, tiny_data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NO_ALBUMENTATIONS_UPDATE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def with_recorder(cfg: Path, folder: Path, pause_at_step: int | None = None, **more: int | str) -> Path:
    """``cfg`` + a :class:`BatchRecorder` into ``folder``; ``more``: its other arguments."""
    data = yaml.safe_load(cfg.read_text())
    args = {"folder": str(folder), "pause_at_step": pause_at_step, **more}
    data["trainer"]["callbacks"].append(
        {"class_path": "tests.train.recorders.BatchRecorder", "init_args": args}
    )
    out = cfg.with_name(f"{cfg.stem}-{folder.name}.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def run_cli(
    args: list[str], timeout: float = 240, env: dict[str, str] | None = None, status: int = 0
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env={**_env(), **(env or {})},
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert done.returncode == status, done.stderr[-3000:]


def weights(folder: Path, rank: int) -> dict[int, float]:
    """The sum of the branch's weights after each step, as BatchRecorder(record_weights=True) wrote it."""
    rows = [json.loads(line) for line in (folder / f"batches-rank{rank}.jsonl").read_text().splitlines()]
    return {row["step"]: row["weights"] for row in rows}


def keys(folder: Path, rank: int = 0) -> list[tuple[int, list[str]]]:
    lines = (folder / f"batches-rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


N = 3  # resume at step N of 2N


@dataclass
class Runs:
    """Tiny data, the shared config overlay and the uninterrupted reference run of 2N steps."""

    data: Path
    config: Path
    full: Path
    full_rec: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_base_sd15) -> Runs:
    tmp = tmp_path_factory.mktemp("resume")
    data = tiny_data(tmp / "data")
    config = overlay(tmp / "o.yaml", every=N, ema=True)
    full, full_rec = tmp / "full", tmp / "rec-full"
    run_cli(
        cli_args(tiny_base_sd15, data, full, with_recorder(config, full_rec), f"--trainer.max_steps={2 * N}")
    )
    return Runs(data, config, full, full_rec)


def assert_same_as_full(runs: Runs, run: Path, rec: Path) -> None:
    assert keys(rec) == keys(runs.full_rec)  # the same samples in the same order, step by step
    for name in ("brushnet", "brushnet_ema"):
        a = BrushNetModel.from_pretrained(runs.full / "export" / f"step-{2 * N:08d}" / name)
        b = BrushNetModel.from_pretrained(run / "export" / f"step-{2 * N:08d}" / name)
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), (name, k)


def test_sigkill_then_resume_is_bit_identical(runs, tmp_path, tiny_base_sd15):
    # the same run, SIGKILLed while step N+1 starts (checkpoint of step N on disk), then resumed
    run, rec = tmp_path / "split", tmp_path / "rec-split"
    args = cli_args(
        tiny_base_sd15, runs.data, run, with_recorder(runs.config, rec, N), f"--trainer.max_steps={2 * N}"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (rec / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it paused"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    resume = cli_args(
        tiny_base_sd15,
        runs.data,
        run,
        with_recorder(runs.config, rec),
        f"--trainer.max_steps={2 * N}",
        "--ckpt_path=last",
    )
    run_cli(resume)
    assert_same_as_full(runs, run, rec)


@pytest.mark.parametrize(("sig", "requeues"), [("SIGUSR1", True), ("SIGTERM", False)])
def test_slurm_signal_mid_step_saves_at_the_step_end_and_resumes_bit_identical(
    runs, tmp_path, tiny_base_sd15, sig, requeues
):
    """A signal arrives inside a step (between forward and backward) of a job that Lightning sees as a
    1-task Slurm job; ``scontrol`` is a recorder on PATH. The hpc checkpoint holds the end of that step,
    SIGUSR1 (the warning signal) requeues the job, SIGTERM (preemption, scancel) leaves that to Slurm, and
    running the same command again (what the requeued job does) finishes as the uninterrupted run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "brushnet-test",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    run, rec = tmp_path / "split", tmp_path / "rec-split"

    def command(recorder: Path) -> list[str]:
        more = (f"--trainer.max_steps={2 * N}", "--ckpt_path=auto")
        return cli_args(tiny_base_sd15, runs.data, run, recorder, *more)

    stopped = 0 if requeues else 128 + signal.SIGTERM  # a stop without a requeue is not a success
    run_cli(command(with_recorder(runs.config, rec, signal_at_step=N, signal=sig)), env=slurm, status=stopped)
    requeued = ["requeue", "4242"] if requeues else []
    assert (calls.read_text().split() if calls.exists() else []) == requeued
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == N + 1  # the end of the step the signal interrupted
    assert [step for step, _ in keys(rec)] == list(range(1, N + 2))  # it stopped right after that step

    run_cli(command(with_recorder(runs.config, rec)), env=slurm)  # the requeued job: the same command
    assert (calls.read_text().split() if calls.exists() else []) == requeued  # no second requeue
    assert_same_as_full(runs, run, rec)


def test_ddp_two_cpu_processes_and_a_nan_on_one_rank(tmp_path, tiny_base_sd15):
    """2 gloo ranks: equal step counts, distinct samples, a loadable checkpoint. A NaN loss on rank 1 alone
    at step 3 makes both ranks skip that update together (no hang at the all-reduce, no divergence)."""
    data = tiny_data(tmp_path / "data")
    rec = tmp_path / "rec"
    cfg = overlay(tmp_path / "o.yaml", every=2, validate_every=2, ema=True)
    cfg = with_recorder(cfg, rec, nan_at_step=2, nan_rank=1, record_weights=True)
    run = tmp_path / "run"
    run_cli(
        cli_args(
            tiny_base_sd15,
            data,
            run,
            cfg,
            "--trainer.max_steps=4",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
        ),
        timeout=400,
    )
    r0, r1 = keys(rec, 0), keys(rec, 1)
    assert [s for s, _ in r0] == [s for s, _ in r1] == [1, 2, 3, 4]  # equal step counts
    seen0 = {k for _, ks in r0 for k in ks}
    seen1 = {k for _, ks in r1 for k in ks}
    assert not seen0 & seen1 or len(seen0 | seen1) == 12  # ranks read distinct samples within an epoch
    w0, w1 = weights(rec, 0), weights(rec, 1)
    assert w0 == w1  # the ranks never diverged
    assert w0[1] != w0[2] and w0[2] == w0[3] and w0[3] != w0[4]  # step 3 (the NaN) was skipped by both
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    exported = BrushNetModel.from_pretrained(run / "export" / "step-00000004" / "brushnet")
    for k, v in exported.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"brushnet.{k}"], v), k
    assert (run / "logs" / "version_0" / "validation" / "step-00000002" / "00.png").is_file()
