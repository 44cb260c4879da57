"""Throughput, memory and gradient norm: :class:`TrainingMonitor`.

The learning rate comes from Lightning's :class:`~lightning.pytorch.callbacks.LearningRateMonitor` (the configs
list both; the module names its schedule ``train/lr``). Everything is logged every ``trainer.log_every_n_steps``
optimizer steps (the global step, whatever the epoch length).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: the accelerator's allocator peak, or the CPU process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def gradient_norm(parameters) -> torch.Tensor | None:
    """The total L2 norm of the gradients (all shards of FSDP2 DTensor gradients: a collective there)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class TrainingMonitor(L.Callback):
    """Logs, every ``trainer.log_every_n_steps`` optimizer steps:

    * ``train/device/samples_per_sec`` (and ``train/samples_per_sec``, all ranks, under DDP/FSDP): the samples
      this rank trained on since the previous logged step, over the time since then;
    * ``train/grad_norm``: the L2 norm of the trainable parameters' gradients before clipping;
    * ``train/peak_mem_gb``: peak accelerator memory (CPU: the process's max RSS);
    * ``train/bad_samples``: the DataModule's running count of skipped samples.

    Not Lightning's ``ThroughputMonitor``: it synchronises CUDA after every micro-batch (one stall of the
    launch queue per micro-batch); this one synchronises once per logged step, where the clock is read.
    """

    def __init__(self) -> None:
        self._clock: tuple[int, float] | None = None  # (global step, time) of the last synchronised reading
        self._samples = 0

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the queued kernels belong to the interval being timed
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = (trainer.global_step, self._now(pl_module.device))
        self._samples = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = gradient_norm(params)  # on every rank: a collective under FSDP2
        if norm is not None:
            pl_module.log("train/grad_norm", norm.float(), batch_size=1, rank_zero_only=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args: Any
    ) -> None:
        self._samples += batch["pixel_values"].shape[0]
        step, every = trainer.global_step, trainer.log_every_n_steps
        assert self._clock is not None
        if not every or step == self._clock[0] or step % every:
            return  # logging off, mid accumulation window, or not a logged step
        now = self._now(pl_module.device)
        rate = self._samples / max(now - self._clock[1], 1e-9)
        self._clock, self._samples = (step, now), 0
        metrics = {
            "train/device/samples_per_sec": rate,
            "train/peak_mem_gb": peak_memory_gb(pl_module.device),
        }
        if trainer.world_size > 1:
            metrics["train/samples_per_sec"] = rate * trainer.world_size
        bad = getattr(getattr(trainer, "datamodule", None), "bad_samples", None)
        if bad is not None:
            metrics["train/bad_samples"] = float(bad)
        pl_module.log_dict(metrics, batch_size=1, rank_zero_only=True)
