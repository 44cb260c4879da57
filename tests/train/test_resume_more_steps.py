"""Train N more steps: a run that ended at ``max_steps`` and is rerun with a larger ``max_steps`` from its
checkpoint is, bit for bit, the run that trained to the larger ``max_steps`` without stopping.

Tiny data: 12 samples, batch 2, so an epoch is 6 steps. The first run of each case ends mid-epoch (step 4)
or on the epoch boundary (step 6); the checkpoint is only written by the end of the run (``every`` is
larger than ``max_steps``), i.e. by what runs when a run ends, not by a mid-run save. The schedule of the
tiny config is constant after warmup, so it does not depend on ``max_steps`` (cosine and linear decay do,
by design: see the README's resume section).
"""

from __future__ import annotations

import pytest

from tests.train.checkpoint_runs import load, max_abs_diff, setup

TOTAL = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base_sd15):
    tmp = tmp_path_factory.mktemp("more-steps")
    runs = setup(tmp, tiny_base_sd15, every=100)
    runs.train_ok(tmp / "full", f"--trainer.max_steps={TOTAL}")
    return runs, load(tmp / "full" / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize(
    ("first", "resume_from"),
    [(4, "checkpoints/step-00000004.ckpt"), (6, "last")],
    ids=["mid-epoch-step-checkpoint", "epoch-boundary-last"],
)
def test_train_n_more_steps_is_the_uninterrupted_run(reference, tmp_path, first, resume_from):
    runs, full = reference
    run = tmp_path / "run"
    runs.train_ok(run, f"--trainer.max_steps={first}")
    ended = load(run / "checkpoints" / "last.ckpt")
    assert ended["global_step"] == first
    ckpt = resume_from if resume_from == "last" else str(run / resume_from)
    runs.train_ok(run, f"--trainer.max_steps={TOTAL}", f"--ckpt_path={ckpt}")
    extended = load(run / "checkpoints" / "last.ckpt")
    assert extended["global_step"] == TOTAL
    diff = max_abs_diff(extended, full)
    assert diff == 0.0, f"{first} + {TOTAL - first} steps differ from {TOTAL} steps by up to {diff:.3g}"
    assert extended["BrushDataModule"] == full["BrushDataModule"]  # the same data position
