"""Checkpoints: atomic Lightning checkpoints and official-format diffusers exports of the branch.

:class:`BrushNetCheckpoint` is a Lightning ``ModelCheckpoint`` whose writes are atomic (temp + rename), which
refuses to save non-finite weights, and which exports the branch (and its EMA) as official-format diffusers
folders at every checkpoint. Its default folder is ``<default_root_dir>/checkpoints`` (not per logger
version), so ``ckpt_path="last"`` finds the previous run's ``last.ckpt``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


def atomic_save_pretrained(model, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained(folder)`` written to a temporary sibling folder and renamed when complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_branches(pl_module, folder: str | os.PathLike, rank: int) -> list[Path]:
    """Export ``brushnet`` (and ``ema`` as ``brushnet_ema``) into ``folder``; collective under FSDP2."""
    from train.fsdp import export_branch, is_sharded

    out = []
    models = [("brushnet", pl_module.brushnet)]
    if getattr(pl_module, "ema", None) is not None:
        models.append(("brushnet_ema", pl_module.ema))
    for name, model in models:
        target = Path(folder) / name
        if is_sharded(model.parameters()):
            done = export_branch(model, target, rank=rank)
        else:
            done = atomic_save_pretrained(model, target) if rank == 0 else None
        if done is not None:
            out.append(done)
    return out


def save_checkpoint_atomically(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` (collective) to a temporary sibling, renamed on rank 0 when complete."""
    # No "last" in the temporary name: Lightning's ckpt_path="last" search must never pick it up.
    tmp = os.path.join(os.path.dirname(filepath), f".{uuid.uuid4().hex[:12]}.partial-{os.getpid()}")
    tmp = trainer.strategy.broadcast(tmp)
    trainer.save_checkpoint(tmp, weights_only)  # collective; ends with a barrier
    if trainer.is_global_zero:
        if os.path.isdir(tmp) and os.path.isdir(filepath):  # sharded (distributed) checkpoint folders
            shutil.rmtree(filepath)
        os.replace(tmp, filepath)
    trainer.strategy.barrier("save_checkpoint_atomically")


class BrushNetCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` + atomic writes + finite-weights check + diffusers export of the branch (and EMA).

    Keep the last K checkpoints with ``monitor="step", mode="max", save_top_k=K`` (as the configs do).
    Exports go to ``<export_dir>/step-XXXXXXXX/{brushnet,brushnet_ema}`` (default export_dir:
    ``<checkpoint dir>/../export``), pruned to the newest ``keep_exports`` (default: ``save_top_k``).
    """

    def __init__(
        self,
        *args: Any,
        export: bool = True,
        export_dir: str | None = None,
        keep_exports: int | None = None,
        save_on_train_end: bool = True,
        save_last: bool | None = True,
        auto_insert_metric_name: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, save_last=save_last, auto_insert_metric_name=auto_insert_metric_name, **kwargs
        )
        self.export = export
        self.export_dir = export_dir
        self.keep_exports = keep_exports
        self.save_on_train_end = save_on_train_end
        self._exported_step = -1
        self.last_export: Path | None = None

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(".*.partial-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also checkpoint (and export) the final step, unless it was just saved."""
        if self.save_on_train_end and trainer.global_step != self._last_global_step_saved:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    @property
    def export_root(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.dirpath).parent / "export"

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        check = getattr(module, "branch_is_finite", None)
        if check is not None and not check():
            raise RuntimeError(
                f"refusing to write {filepath}: the branch (or its EMA) has NaN/Inf weights at step "
                f"{trainer.global_step}; the previous checkpoints are left untouched"
            )
        save_checkpoint_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        if self.export and trainer.global_step != self._exported_step:
            self._exported_step = trainer.global_step
            self._export(trainer, module)

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        folder = self.export_root / f"step-{trainer.global_step:08d}"
        done = export_branches(module, folder, trainer.global_rank)
        if trainer.is_global_zero and done:
            self.last_export = folder
            log.info("exported %s", ", ".join(str(p) for p in done))
            keep = self.keep_exports if self.keep_exports is not None else max(self.save_top_k, 1)
            steps = sorted(p for p in self.export_root.glob("step-*") if p.is_dir())
            for old in steps[: max(0, len(steps) - keep)]:
                shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("BrushNetCheckpoint.export")
