"""Exact resume on SD3 and Flux bases through the installed ``brushnet-train``: a run SIGKILLed mid-way and
resumed with ``--ckpt_path=last``, and a finished run given more steps, end bit-identical (branch, EMA and
optimizer state) to the uninterrupted run, having seen the same samples in the same order."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from brushnet.dit.loading import load_dit_branch
from tests.train.checkpoint_runs import BRUSHNET_TRAIN, ROOT, _env, load, max_abs_diff
from tests.train.cli_runs import cli_args, overlay, tiny_data
from tests.train.dit_runs import FAMILIES, dit_base
from tests.train.test_resume import keys, with_recorder

pytestmark = pytest.mark.slow

N = 3  # interrupt at step N of 2N (checkpoints every N steps)


@dataclass
class Reference:
    base: Path
    data: Path
    config: Path
    full: Path
    full_rec: Path

    def args(self, run: Path, recorder: Path, *more: str) -> list[str]:
        return cli_args(self.base, self.data, run, recorder, *more)


def train_ok(args: list[str]) -> None:
    done = subprocess.run(
        [str(BRUSHNET_TRAIN), *args], cwd=ROOT, env=_env(), timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tmp_path_factory) -> Reference:
    tmp = tmp_path_factory.mktemp(f"dit-resume-{request.param}")
    base = dit_base(tmp_path_factory, request.param)
    config = overlay(tmp / "o.yaml", every=N, ema=True)
    ref = Reference(base, tiny_data(tmp / "data"), config, tmp / "full", tmp / "rec-full")
    train_ok(ref.args(ref.full, with_recorder(config, ref.full_rec), f"--trainer.max_steps={2 * N}"))
    return ref


def assert_same_as_full(ref: Reference, run: Path) -> None:
    for name in ("brushnet", "brushnet_ema"):
        a = load_dit_branch(ref.full / "export" / f"step-{2 * N:08d}" / name)
        b = load_dit_branch(run / "export" / f"step-{2 * N:08d}" / name)
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), (name, k)
    full, resumed = load(ref.full / "checkpoints" / "last.ckpt"), load(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 2 * N
    assert max_abs_diff(full, resumed) == 0.0  # branch, EMA and every optimizer state tensor


def test_sigkill_then_resume_is_bit_identical(reference, tmp_path):
    run, rec = tmp_path / "split", tmp_path / "rec-split"
    args = reference.args(run, with_recorder(reference.config, rec, N), f"--trainer.max_steps={2 * N}")
    proc = subprocess.Popen(
        [str(BRUSHNET_TRAIN), *args],
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
    train_ok(
        reference.args(
            run, with_recorder(reference.config, rec), f"--trainer.max_steps={2 * N}", "--ckpt_path=last"
        )
    )
    assert keys(rec) == keys(reference.full_rec)  # the same samples in the same order, step by step
    assert_same_as_full(reference, run)


def test_train_n_more_steps_is_the_uninterrupted_run(reference, tmp_path):
    run, rec = tmp_path / "more", tmp_path / "rec-more"
    train_ok(reference.args(run, with_recorder(reference.config, rec), f"--trainer.max_steps={N}"))
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] == N
    train_ok(
        reference.args(
            run, with_recorder(reference.config, rec), f"--trainer.max_steps={2 * N}", "--ckpt_path=last"
        )
    )
    assert keys(rec) == keys(reference.full_rec)
    assert_same_as_full(reference, run)
