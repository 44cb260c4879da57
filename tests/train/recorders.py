"""Test-only callback used by the subprocess runs: records batch keys per step and can park the process."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import lightning as L


class BatchRecorder(L.Callback):
    """Appends ``{"rank", "step", "keys"}`` per training batch to ``<folder>/batches-rank<r>.jsonl``. With
    ``pause_at_step`` the process writes ``<folder>/paused`` when that step starts (so the checkpoint of
    the step before is on disk) and then waits to be killed. With ``signal_at_step`` the process sends itself
    ``signal`` in the middle of that step (after the forward, before the backward). With ``nan_at_step``
    rank ``nan_rank`` poisons its batch of that step with NaN pixels; ``record_weights`` adds the sum of the
    branch's weights (after the step) to each row."""

    def __init__(
        self,
        folder: str,
        pause_at_step: int | None = None,
        signal_at_step: int | None = None,
        signal: str = "SIGUSR1",
        nan_at_step: int | None = None,
        nan_rank: int = 0,
        record_weights: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.pause_at_step = pause_at_step
        self.signal_at_step = signal_at_step
        self.signal = signal
        self.nan_at_step, self.nan_rank = nan_at_step, nan_rank
        self.record_weights = record_weights

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.signal_at_step:
            os.kill(os.getpid(), signal.Signals[self.signal])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.nan_at_step and trainer.global_rank == self.nan_rank:
            batch["pixel_values"].mul_(float("nan"))
        if self.pause_at_step is not None and trainer.global_step == self.pause_at_step:
            (self.folder / "paused").write_text(str(trainer.global_step))
            while True:
                time.sleep(1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        row = {"rank": trainer.global_rank, "step": trainer.global_step, "keys": list(batch["keys"])}
        if self.record_weights:
            row["weights"] = sum(float(p.double().sum()) for p in pl_module.brushnet.parameters())
        with open(self.folder / f"batches-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
