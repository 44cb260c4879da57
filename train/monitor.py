"""Throughput and memory: :class:`TrainingMonitor` logs samples/s, peak memory, learning rate and the
DataModule's bad-sample count."""

from __future__ import annotations

import logging
import resource
import sys
import time

import lightning as L
import torch

log = logging.getLogger(__name__)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: the accelerator's allocator peak, or the CPU process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class TrainingMonitor(L.Callback):
    """Logs ``train/samples_per_s`` (all ranks), ``train/peak_mem_gb``, ``train/lr`` and
    ``train/bad_samples`` (the DataModule's running count of skipped samples)."""

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch["pixel_values"].shape[0] * trainer.world_size
        if (batch_idx + 1) % self.log_every_n_steps:
            return
        now = time.perf_counter()
        metrics = {
            "train/samples_per_s": self._samples / max(now - self._t0, 1e-9),
            "train/peak_mem_gb": peak_memory_gb(pl_module.device),
        }
        if trainer.optimizers:
            metrics["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bad_samples"):
            metrics["train/bad_samples"] = float(datamodule.bad_samples)
        pl_module.log_dict(metrics, batch_size=batch["pixel_values"].shape[0], rank_zero_only=True)
        self._t0, self._samples = now, 0
