"""Checkpoint files of :class:`BrushNetCheckpoint`: sha256 sidecars, staging next to the destination (not
``$TMPDIR``), clean failure on a failed write, permissions from the umask, and the resume rule's choice.

Fast cases train a toy LightningModule with the real callback in-process; the ``slow`` ones run the
installed ``brushnet-train`` on a full disk (``RLIMIT_FSIZE``) and under a group umask.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.train.checkpoint_runs import setup, weight_offset
from train.checkpoint_io import CheckpointError, checksum_path, recorded_step
from train.checkpointing import BrushNetCheckpoint, resolve_auto_ckpt


class Toy(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root: Path, max_steps: int, ckpt_path: str | None = None) -> BrushNetCheckpoint:
    """12 samples, batch 2; checkpoints every 2 steps, keep 2 (the configs' settings)."""
    callback = BrushNetCheckpoint(
        every_n_train_steps=2,
        save_top_k=2,
        monitor="step",
        mode="max",
        filename="step-{step:08d}",
        export=False,
    )
    trainer = L.Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g))
    trainer.fit(Toy(), DataLoader(data, batch_size=2), ckpt_path=ckpt_path)
    return callback


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_every_checkpoint_has_a_sha256sum_sidecar(tmp_path):
    fit(tmp_path, 4)
    ckpts = tmp_path / "checkpoints"
    assert names(ckpts) == {
        f"{n}{s}" for n in ("step-00000002.ckpt", "step-00000004.ckpt", "last.ckpt") for s in ("", ".sha256")
    }
    for path in ckpts.glob("*.ckpt"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert checksum_path(path).read_text() == f"{digest}  {path.name}\n"
    if shutil.which("sha256sum"):  # the documented manual check
        check = subprocess.run(["sha256sum", "-c", "last.ckpt.sha256"], cwd=ckpts, capture_output=True)
        assert check.returncode == 0, check.stdout


def test_resume_rule_is_the_highest_recorded_step(tmp_path):
    fit(tmp_path, 4)
    ckpts = tmp_path / "checkpoints"
    last, step4 = ckpts / "last.ckpt", ckpts / "step-00000004.ckpt"
    # a requeue checkpoint of step 2, written "later" (a copied folder) and numbered high: older state
    hpc = tmp_path / "hpc_ckpt_9.ckpt"
    shutil.copyfile(ckpts / "step-00000002.ckpt", hpc)
    shutil.copyfile(checksum_path(ckpts / "step-00000002.ckpt"), checksum_path(hpc))
    os.utime(hpc, ns=(2 * 10**18, 2 * 10**18))
    assert resolve_auto_ckpt(tmp_path) in (str(last), str(step4))
    # the step checkpoint exists but last.ckpt does not (killed between the two saves)
    last.unlink()
    assert resolve_auto_ckpt(tmp_path) == str(step4)
    # a renamed file keeps its recorded step: the name says nothing
    renamed = ckpts / "step-00000099.ckpt"
    (ckpts / "step-00000002.ckpt").rename(renamed)
    checksum_path(ckpts / "step-00000002.ckpt").rename(checksum_path(renamed))
    assert recorded_step(renamed) == 2 and resolve_auto_ckpt(tmp_path) == str(step4)
    # a requeue save of a later step wins, whatever its number and mtime
    newer = torch.load(step4, weights_only=False)
    newer["global_step"] = 5
    later = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save(newer, later)
    os.utime(later, ns=(10**9, 10**9))
    assert resolve_auto_ckpt(tmp_path) == str(later)


def test_damaged_checkpoints_are_skipped_then_refused(tmp_path, caplog):
    fit(tmp_path, 4)
    ckpts = tmp_path / "checkpoints"
    last, step4, step2 = (ckpts / n for n in ("last.ckpt", "step-00000004.ckpt", "step-00000002.ckpt"))
    data = bytearray(last.read_bytes())
    data[weight_offset(last, "net.weight")] ^= 0xFF  # a readable file with one wrong weight
    last.write_bytes(bytes(data))
    step4.write_bytes(step4.read_bytes()[:100])  # truncated
    assert resolve_auto_ckpt(tmp_path) == str(step2)
    assert f"checkpoint {last}: sha256 of last.ckpt is" in caplog.text
    assert f"checkpoint {step4}: " in caplog.text
    step2.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no valid checkpoint .* is empty \(0 bytes\)"):
        resolve_auto_ckpt(tmp_path)


def test_moved_run_folder_resumes_newest_without_version_suffixes(tmp_path):
    fit(tmp_path / "a", 4)
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    ckpt = resolve_auto_ckpt(moved)
    assert recorded_step(ckpt) == 4
    fit(moved, 8, ckpt_path=ckpt)
    ckpts = moved / "checkpoints"
    assert not [n for n in names(ckpts) if "-v" in n]  # no last-v1.ckpt that auto would never read
    # the copied step 2 and 4 files are orphans of the old folder (Lightning does not know them): pruned
    assert {n for n in names(ckpts) if n.endswith(".ckpt")} == {
        "step-00000006.ckpt",
        "step-00000008.ckpt",
        "last.ckpt",
    }
    assert recorded_step(ckpts / "last.ckpt") == 8


def test_full_tmpdir_does_not_matter(tmp_path, monkeypatch):
    """Lightning staged every checkpoint in ``$TMPDIR`` (fsspec transaction): a full one broke the save."""
    real = tempfile.mkstemp

    def full_tmpdir(*args, **kwargs):
        if kwargs.get("dir") is None and (len(args) < 3 or args[2] is None):
            raise OSError(errno.ENOSPC, "No space left on device", tempfile.gettempdir())
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full_tmpdir)
    fit(tmp_path, 2)
    assert recorded_step(tmp_path / "checkpoints" / "last.ckpt") == 2


def test_failed_write_names_the_file_and_leaves_no_partial(tmp_path, monkeypatch):
    def disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)  # part of the checkpoint reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        OSError, match=r"cannot save checkpoint .*step-00000002\.ckpt: No space left"
    ) as error:
        fit(tmp_path, 2)
    assert error.value.errno == errno.ENOSPC
    assert names(tmp_path / "checkpoints") == set()  # no partial, no checkpoint, no sidecar


def test_checkpoints_respect_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        fit(tmp_path, 2)
    finally:
        os.umask(old)
    ckpts = tmp_path / "checkpoints"
    assert stat.S_IMODE(ckpts.stat().st_mode) == 0o775
    for path in ckpts.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.mark.slow
def test_run_on_a_full_disk_fails_naming_the_file_and_cleans_up(tmp_path, tiny_base_sd15):
    """Every file over 4 MB fails to write (EFBIG, as a full disk's ENOSPC): the first checkpoint (15 MB).
    A temporary left by an earlier killed save is removed before anything is written, and the failed
    save leaves none; ``$TMPDIR`` stays empty."""
    runs = setup(tmp_path, tiny_base_sd15, every=2)
    run, tmpdir = tmp_path / "run", tmp_path / "tmpdir"
    tmpdir.mkdir()
    (run / "checkpoints").mkdir(parents=True)
    stale = run / "checkpoints" / ".last.ckpt.partial-0123456789ab"
    stale.write_bytes(b"x" * 1000)
    done = runs.train(run, "--trainer.max_steps=2", max_file_bytes=4 << 20, env={"TMPDIR": str(tmpdir)})
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert f"cannot save checkpoint {run / 'checkpoints' / 'step-00000002.ckpt'}: File too large" in last_line
    assert not [p for p in run.rglob("*") if ".partial-" in p.name]
    assert not list(tmpdir.iterdir())


@pytest.mark.slow
def test_run_outputs_respect_the_umask(tmp_path, tiny_base_sd15):
    runs = setup(tmp_path, tiny_base_sd15, every=2, validate_every=2)
    run = tmp_path / "run"
    runs.train_ok(run, "--trainer.max_steps=2", umask=0o002)
    found = modes(run)
    exported = [k for k in found if k.startswith("export/step-00000002/brushnet/")]
    assert exported and any(k.endswith(".safetensors") for k in exported)
    assert any(k.startswith("checkpoints/") for k in found)
    assert any(k.endswith(".png") for k in found)  # the validation grids
    wrong = {k: oct(m) for k, m in found.items() if m != (0o775 if (run / k).is_dir() else 0o664)}
    assert not wrong
