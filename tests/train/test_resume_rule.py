"""One resume rule, by the installed ``brushnet-train``: ``--ckpt_path last`` and ``auto`` take the valid
checkpoint with the highest recorded step, whatever its kind, also after a kill between two saves and
after the run folder was moved; the resumed run overwrites (no ``last-v1.ckpt``) and prunes to
``save_top_k``."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.train.checkpoint_runs import copy_run, load, setup
from train.checkpoint_io import checksum_path, recorded_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_sd15):
    """4 steps, checkpoints at 2 and 4 (``step-*`` + ``last``)."""
    tmp = tmp_path_factory.mktemp("rule")
    runs = setup(tmp, tiny_base_sd15, every=2)
    runs.train_ok(tmp / "run", "--trainer.max_steps=4")
    return runs, tmp / "run"


def test_step_checkpoint_without_last_resumes_from_its_step(trained, tmp_path):
    """A kill (or a full disk) between ``step-00000004.ckpt`` and ``last.ckpt``: ``last`` resumes from 4."""
    runs, source = trained
    run = copy_run(source, tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    last.unlink()
    checksum_path(last).unlink()
    done = runs.train_ok(run, "--trainer.max_steps=5", "--ckpt_path=last")
    assert f"resuming from {run / 'checkpoints' / 'step-00000004.ckpt'} (global step 4)" in done.stderr
    assert recorded_step(last) == 5
    assert load(last)["BrushDataModule"]["consumed_samples"] == 10  # 5 batches of 2: one step after 4


def test_moved_run_folder_resumes_its_newest_state(trained, tmp_path):
    """Copied elsewhere, with a requeue checkpoint of step 2 copied last (the newest mtime, the highest
    hpc number): ``auto`` still resumes from step 4, writes ``last.ckpt`` (not ``last-v1.ckpt``) and keeps
    ``save_top_k`` step checkpoints."""
    runs, source = trained
    run = copy_run(source, tmp_path / "moved")
    hpc = run / "hpc_ckpt_3.ckpt"
    shutil.copyfile(run / "checkpoints" / "step-00000002.ckpt", hpc)
    shutil.copyfile(checksum_path(run / "checkpoints" / "step-00000002.ckpt"), checksum_path(hpc))
    os.utime(hpc, ns=(4 * 10**18, 4 * 10**18))
    done = runs.train_ok(run, "--trainer.max_steps=6", "--ckpt_path=auto")
    assert "(global step 4)" in done.stderr
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step-00000004.ckpt", "step-00000006.ckpt"], ckpts
    assert recorded_step(run / "checkpoints" / "last.ckpt") == 6
    assert sorted(p.name for p in (run / "export").iterdir()) == ["step-00000004", "step-00000006"]
