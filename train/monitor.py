"""Throughput, memory and gradient norm: :class:`TrainingMonitor`.

Lightning's :class:`~lightning.pytorch.callbacks.ThroughputMonitor` measures the throughput; the learning
rate comes from Lightning's :class:`~lightning.pytorch.callbacks.LearningRateMonitor` (the configs list both;
the module names its schedule ``train/lr``). Everything is logged every ``trainer.log_every_n_steps``
optimizer steps (the global step, whatever the epoch length).
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
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


class TrainingMonitor(ThroughputMonitor):
    """Logs, besides ThroughputMonitor's ``train/device/samples_per_sec`` (and ``train/samples_per_sec`` for
    all ranks under DDP/FSDP) over the last ``window_size`` batches:

    * ``train/grad_norm``: the L2 norm of the trainable parameters' gradients before clipping;
    * ``train/peak_mem_gb``: peak accelerator memory (CPU: the process's max RSS);
    * ``train/bad_samples``: the DataModule's running count of skipped samples.
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=lambda batch: batch["pixel_values"].shape[0], window_size=window_size)
        self._module_has_flops = False  # no FLOP count: skip ThroughputMonitor's warning asking for one

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = gradient_norm(params)  # on every rank: a collective under FSDP2
        if norm is not None:
            pl_module.log("train/grad_norm", norm.float(), batch_size=1, rank_zero_only=True)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, *args: Any
    ):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        metrics = {"train/peak_mem_gb": peak_memory_gb(pl_module.device)}
        bad = getattr(getattr(trainer, "datamodule", None), "bad_samples", None)
        if bad is not None:
            metrics["train/bad_samples"] = float(bad)
        pl_module.log_dict(metrics, batch_size=1, rank_zero_only=True)
