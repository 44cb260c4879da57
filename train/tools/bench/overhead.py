"""Framework overhead: whole loop iterations of ``Trainer.fit`` against a bare PyTorch loop over the same
module, batch and optimizer (fp32 AdamW), alternated round by round."""

from __future__ import annotations

import time

import lightning as L
from torch.utils.data import DataLoader

from train.data.transforms import normalize_batch
from train.module import BrushNetTrainingModule
from train.optim import build_optimizer
from train.tools.bench.common import median
from train.tools.bench.limits import sync


class _Timer(L.Callback):
    """Seconds from one batch start to the next: the whole loop iteration, Lightning's own work included
    (fetching, hooks, logging, the LR scheduler), as the bare loop's timing includes all of its work."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t: float | None = None

    def on_train_batch_start(self, *args) -> None:
        now = time.perf_counter()
        if self._t is not None:
            self.times.append(now - self._t)
        self._t = now


def bare_loop(module: BrushNetTrainingModule, batch: dict, steps: int) -> list[float]:
    opt = build_optimizer(module.brushnet.parameters(), "adamw", lr=1e-5)
    device = batch["pixel_values"].device
    times, last = [], time.perf_counter()
    for i in range(steps + 1):
        loss = module.compute_loss(normalize_batch(batch), module.step_generator(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[1:]


def lightning_loop(module: BrushNetTrainingModule, batch: dict, steps: int) -> list[float]:
    timer = _Timer()
    device = batch["pixel_values"].device
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps + 2,  # intervals between batch starts: 1 warm-up + steps
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = DataLoader([batch] * (steps + 2), batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, loader)
    return timer.times[1:]


def lightning_overhead(module: BrushNetTrainingModule, batch: dict, steps: int, rounds: int) -> dict:
    bare: list[float] = []
    light: list[float] = []
    for _ in range(rounds):
        bare += bare_loop(module, batch, steps)
        light += lightning_loop(module, batch, steps)
    b, lt = median(bare), median(light)
    return {"bare_s": b, "lightning_s": lt, "ratio": lt / b, "steps": len(bare)}
