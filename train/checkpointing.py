"""Checkpoints: verified Lightning checkpoints, the resume rule, and official-format diffusers exports.

:class:`BrushNetCheckpoint` is a Lightning ``ModelCheckpoint`` whose writes are atomic and checksummed
(:mod:`train.checkpoint_io`), which refuses to save non-finite weights, and which exports the branch (and
its EMA) as official-format diffusers folders at every checkpoint. Its default folder is
``<default_root_dir>/checkpoints`` (not per logger version).

The resume rule (:func:`resolve_auto_ckpt`, what ``--ckpt_path auto`` and ``--ckpt_path last`` mean): the
valid checkpoint with the highest recorded ``global_step`` among ``<default_root_dir>/hpc_ckpt_*.ckpt``
and every ``*.ckpt`` in the checkpoint folder, whatever its name (``step-N``, ``last``, ``hpc_ckpt_N``);
the step is read from the file, never from its name or mtime, so a copied or moved run folder resumes
from its newest state. A checkpoint that fails verification is skipped with a warning naming it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from brushnet.atomic import atomic_folder, remove_partials, remove_path
from train.checkpoint_io import (
    CheckpointError,
    checksum_path,
    recorded_step,
    remove_checkpoint_files,
    save_checkpoint_atomically,
    use_staged_io,
    verify_checkpoint,
)
from train.requeue import hpc_checkpoints

log = logging.getLogger(__name__)

LIGHTNING_CKPT_NAMES = ("hpc", "best", "registry")  # other ckpt_path keywords, left to Lightning


def atomic_save_pretrained(model, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained(folder)`` written to a temporary sibling folder and renamed when complete."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


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


def checkpoint_files(root_dir: str | os.PathLike, checkpoint_dirs: list[Path] | None = None) -> list[Path]:
    """The checkpoints a resume considers: hpc checkpoints in ``root_dir`` and ``*.ckpt`` in the folders."""
    root = Path(root_dir)
    found = list(hpc_checkpoints(root))
    for folder in checkpoint_dirs or [root / "checkpoints"]:
        found += sorted(p for p in Path(folder).glob("*.ckpt") if not p.name.startswith("."))
    unique = {p.resolve(): p for p in found}
    return list(unique.values())


def resolve_auto_ckpt(root_dir: str | os.PathLike, checkpoint_dirs: list[Path] | None = None) -> str | None:
    """The checkpoint ``--ckpt_path auto`` (and ``last``) resumes from: the valid one with the highest
    recorded global step (see the module docstring); ``None`` when there is none. Raises
    :class:`CheckpointError` when checkpoints exist but none is valid (starting over would be a surprise)."""
    ranked, refused = [], []
    for path in checkpoint_files(root_dir, checkpoint_dirs):
        try:
            # equal steps (step-N and last of one save) hold the same state: last.ckpt, then the later
            ranked.append((recorded_step(path), path.name == "last.ckpt", path.stat().st_mtime_ns, str(path)))
        except CheckpointError as e:
            why = e
            try:  # a recorded checksum that differs explains the damage better than the unpickling error
                verify_checkpoint(path)
            except CheckpointError as better:
                why = better
            refused.append(str(why))
            log.warning("not resuming from it: %s", why)
    for step, _, _, path in sorted(ranked, reverse=True):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            refused.append(str(e))
            log.warning("not resuming from it: %s; trying the previous checkpoint", e)
            continue
        log.info("resuming from %s (global step %d)", path, step)
        return path
    if refused:
        raise CheckpointError(
            Path(root_dir),
            f"no valid checkpoint to resume from ({'; '.join(refused)}); move the damaged files away "
            "to start over",
        )
    return None


def brushnet_checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders of the trainer's :class:`BrushNetCheckpoint` callbacks (their default if not set up)."""
    dirs = []
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, BrushNetCheckpoint):
            dirs.append(Path(cb.dirpath or Path(trainer.default_root_dir) / "checkpoints"))
    return dirs or [Path(trainer.default_root_dir) / "checkpoints"]


def resolve_ckpt_path(ckpt_path: str | None, trainer: L.Trainer) -> str | None:
    """What the CLI passes to ``Trainer.fit``: ``auto``/``last`` by :func:`resolve_auto_ckpt`, a file path
    verified (:class:`CheckpointError` if bad). Temporaries of interrupted saves are removed first."""
    dirs = brushnet_checkpoint_dirs(trainer)
    if trainer.is_global_zero:
        for folder in [Path(trainer.default_root_dir), *dirs]:
            if folder.is_dir():
                remove_partials(folder)
    if ckpt_path in ("auto", "last"):
        return resolve_auto_ckpt(trainer.default_root_dir, dirs)
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES:
        return ckpt_path
    verify_checkpoint(ckpt_path)
    return ckpt_path


def _run_ends_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop stops after the current batch (max_steps, the last batch of max_epochs, or a
    stop request already made, e.g. by ``max_time``)."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    progress = trainer.fit_loop.epoch_loop.batch_progress
    last_batch = progress.is_last_batch or progress.current.ready >= trainer.num_training_batches
    max_epochs = trainer.max_epochs
    if last_batch and max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return trainer.should_stop


class BrushNetCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` + atomic, checksummed writes + finite-weights check + diffusers export.

    Keep the last K checkpoints with ``monitor="step", mode="max", save_top_k=K`` (as the configs do); then
    ``step`` checkpoints left by other runs of the folder (a copied folder, a killed run) are pruned to
    the K newest too. Files are overwritten in place, never versioned (``last-v1.ckpt``).
    Exports go to ``<export_dir>/step-XXXXXXXX/{brushnet,brushnet_ema}`` (default export_dir:
    ``<checkpoint dir>/../export``), pruned to the newest ``keep_exports`` (default: ``save_top_k``).

    ``save_on_train_end``: the final step is saved when it ends (as ``on_train_batch_end`` does for the
    ``every_n_train_steps`` ones), not after the fit loop has closed its epoch, so "train N more steps"
    from it is the same run as training on without a stop.
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
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            save_last=save_last,
            auto_insert_metric_name=auto_insert_metric_name,
            enable_version_counter=enable_version_counter,
            **kwargs,
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
        use_staged_io(trainer.strategy)  # before Lightning loads the checkpoint to resume from
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            remove_partials(self.dirpath)  # left by a killed run

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if (
            self.save_on_train_end
            and _run_ends_after_this_batch(trainer)
            and not self._should_skip_saving_checkpoint(trainer)
        ):
            self._save_final(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final step if no batch end did (a stop requested after it, e.g. at an epoch end)."""
        if self.save_on_train_end and trainer.global_step != self._last_global_step_saved:
            self._save_final(trainer)

    def _save_final(self, trainer: L.Trainer) -> None:
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
            self._prune_orphans(trainer, Path(filepath))
        if self.export and trainer.global_step != self._exported_step:
            self._exported_step = trainer.global_step
            self._export(trainer, module)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            remove_path(checksum_path(filepath))

    def _prune_orphans(self, trainer: L.Trainer, written: Path) -> None:
        """Keep the ``save_top_k`` newest (by recorded step) of our own step checkpoints in the folder."""
        if self.monitor != "step" or self.mode != "max" or self.save_top_k < 1:
            return
        if written.name.startswith(self.CHECKPOINT_NAME_LAST):
            return
        steps = []
        for path in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}"):
            last = path.name.startswith(self.CHECKPOINT_NAME_LAST)
            if last or path.name.startswith(".") or not checksum_path(path).is_file():
                continue  # last.ckpt, temporaries and files this callback did not write
            try:
                step = recorded_step(path)
            except CheckpointError:
                step = -1  # damaged: the first to go
            if step <= trainer.global_step:  # a later step belongs to another run of the folder: kept
                steps.append((step, path.resolve() == written.resolve(), path))
        for _, is_new, path in sorted(steps, reverse=True)[self.save_top_k :]:
            if not is_new:
                log.info("pruning %s (more than save_top_k=%d step checkpoints)", path, self.save_top_k)
                remove_checkpoint_files(path)

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        folder = self.export_root / f"step-{trainer.global_step:08d}"
        done = export_branches(module, folder, trainer.global_rank)
        if trainer.is_global_zero and done:
            self.last_export = folder
            log.info("exported %s", ", ".join(str(p) for p in done))
            keep = self.keep_exports if self.keep_exports is not None else max(self.save_top_k, 1)
            steps = sorted(p for p in self.export_root.glob("step-*") if p.is_dir())
            for old in steps[: max(0, len(steps) - keep)]:
                remove_path(old)
        trainer.strategy.barrier("BrushNetCheckpoint.export")
