"""Damaged checkpoints are refused by name, and ``--ckpt_path auto`` falls back to the previous valid one.

A 4-step run checkpoints steps 2 and 4 (``step-*.ckpt`` + ``last.ckpt``, each with its ``.sha256``). Each
case damages ``last.ckpt`` and ``step-00000004.ckpt`` the way disks and kills do, then resumes with the
installed ``brushnet-train``: naming the damaged file exits non-zero with one line naming it, and ``auto``
resumes from step 2.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from tests.train.checkpoint_runs import copy_run, load, setup, weight_offset
from train.checkpoint_io import CheckpointError, checksum_path, verify_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base_sd15):
    tmp = tmp_path_factory.mktemp("integrity")
    runs = setup(tmp, tiny_base_sd15, every=2)
    runs.train_ok(tmp / "run", "--trainer.max_steps=4")
    return runs, tmp / "run"


def weight_key(path: Path) -> str:
    """A branch weight of at least 16 elements (64 bytes)."""
    state = load(path)["state_dict"]
    return next(k for k, v in state.items() if k.startswith("brushnet.") and v.numel() >= 16)


def flip_bytes(path: Path) -> None:
    """64 bytes inside a weight tensor set to 0x7f: huge but finite weights (a flipped disk block)."""
    data = bytearray(path.read_bytes())
    at = weight_offset(path, weight_key(path))
    data[at : at + 64] = b"\x7f" * 64
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def nan_with_matching_checksum(path: Path) -> None:
    """A NaN weight in a checkpoint whose sidecar matches it (e.g. saved by a version without the check)."""
    checkpoint = load(path)
    checkpoint["state_dict"][weight_key(path)].view(-1)[0] = float("nan")
    torch.save(checkpoint, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    checksum_path(path).write_text(f"{digest}  {path.name}\n")


DAMAGE = {
    "flipped-bytes": (flip_bytes, "sha256 of"),
    "truncated": (truncate, "sha256 of"),
    "empty": (empty, "is empty (0 bytes)"),
    "nan-weights": (nan_with_matching_checksum, "holds NaN/Inf"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_refused_and_auto_falls_back(trained, tmp_path, kind):
    runs, source = trained
    run = copy_run(source, tmp_path / "run")
    damage, reason = DAMAGE[kind]
    last = run / "checkpoints" / "last.ckpt"
    for path in (last, run / "checkpoints" / "step-00000004.ckpt"):
        damage(path)
    with pytest.raises(CheckpointError, match=re.escape(reason)):
        verify_checkpoint(last)

    named = runs.train(run, "--trainer.max_steps=6", f"--ckpt_path={last}")
    assert named.returncode != 0
    assert f"checkpoint {last}: " in named.stderr and reason in named.stderr
    assert "Traceback" not in named.stderr  # an expected error: one line, not a traceback

    done = runs.train_ok(run, "--trainer.max_steps=6", "--ckpt_path=auto")
    assert f"not resuming from it: checkpoint {last}: " in done.stderr
    step2 = run / "checkpoints" / "step-00000002.ckpt"
    assert f"resuming from {step2} (global step 2)" in done.stderr
    resumed = load(last)
    assert resumed["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in resumed["state_dict"].values())
    biggest = max(float(v.abs().max()) for v in resumed["state_dict"].values())
    assert biggest < 100.0  # not trained on from the damaged weights (0x7f7f7f7f is 3.4e38)
    verify_checkpoint(last)  # the new checkpoint and its sidecar agree


def test_all_damaged_is_an_error_not_a_fresh_start(trained, tmp_path):
    runs, source = trained
    run = copy_run(source, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.ckpt"):
        empty(path)
    done = runs.train(run, "--trainer.max_steps=6", "--ckpt_path=auto")
    assert done.returncode != 0
    assert "no valid checkpoint to resume from" in done.stderr
    assert all(p.stat().st_size == 0 for p in (run / "checkpoints").glob("*.ckpt"))  # nothing overwritten
