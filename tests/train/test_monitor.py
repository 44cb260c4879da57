"""TrainingMonitor + LearningRateMonitor log by global step, also when an epoch is shorter than the interval."""

from __future__ import annotations

import csv

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.utils.data import DataLoader

from train.monitor import TrainingMonitor


class Regression(L.LightningModule):
    """A linear fit on dict batches (``pixel_values``, ``y``) that records its own gradient norms."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
        self.norms: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        return ((batch["pixel_values"] @ (self.w + self.frozen) - batch["y"]) ** 2).mean()

    def on_before_optimizer_step(self, optimizer):
        self.norms[self.global_step + 1] = float(self.w.grad.square().sum().sqrt())  # independent of ours

    def configure_optimizers(self):
        opt = torch.optim.SGD([self.w], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"},
        }


def test_metrics_are_logged_every_n_global_steps_across_short_epochs(tmp_path, monkeypatch):
    clock = iter(range(100))  # the monitor's clock ticks 1 s per reading: samples/s = samples per interval
    monkeypatch.setattr(TrainingMonitor, "_now", lambda self, device: float(next(clock)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g)
    samples = [{"pixel_values": x[i], "y": x[i].sum() * 2} for i in range(12)]
    data = DataLoader(samples, batch_size=4)  # 3 batches per epoch, fewer than the log interval
    module = Regression()
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=logger,
        callbacks=[TrainingMonitor(), LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=4,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    logger.save()
    with open(logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))

    def steps(metric: str) -> list[int]:
        return sorted({int(r["step"]) for r in rows if r.get(metric)})

    # CSVLogger's step is the 0-based index of the optimizer step: steps 4, 8, 12 -> 3, 7, 11
    for metric in ("train/device/samples_per_sec", "train/grad_norm", "train/peak_mem_gb", "train/lr"):
        assert steps(metric) == [3, 7, 11], (metric, steps(metric))
    by_step = {int(r["step"]): r for r in rows if r.get("train/grad_norm")}
    assert sorted(by_step) == [3, 7, 11]
    for step, row in by_step.items():
        expected = module.norms[step + 1]
        assert abs(float(row["train/grad_norm"]) - expected) <= 1e-6 * max(1.0, expected), step
    lrs = {int(r["step"]): float(r["train/lr"]) for r in rows if r.get("train/lr")}
    assert lrs == {3: 0.1 / 4, 7: 0.1 / 8, 11: 0.1 / 12}
    rates = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    assert rates == [16.0, 16.0, 16.0]  # 4 steps of 4 samples between readings
