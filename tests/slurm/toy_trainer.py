"""A stand-in for ``python -m train`` taking the arguments slurm/train.sh passes (toy model, real Lightning).

It isolates the Slurm side of training: DDP from the Slurm allocation, the trainer's SIGUSR1 requeue
(``train.requeue.SlurmRequeue``: hpc checkpoint at a step boundary + ``scontrol requeue``), and
``--ckpt_path auto`` (``train.checkpointing.resolve_auto_ckpt``) on restart. Every step uses the same batch,
so the result depends only on the model/optimizer state and the step count, not on the data position.
Writes ``progress.txt`` (global step, rank 0) during training and ``final.pt`` + ``result.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from train.checkpointing import resolve_auto_ckpt
from train.cli import close_process_group
from train.requeue import SlurmRequeue


class Toy(L.LightningModule):
    def __init__(self, step_seconds: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.step_seconds = step_seconds

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        time.sleep(self.step_seconds)  # slow enough to be interrupted mid-run
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "progress.txt"
            path.write_text(str(self.trainer.global_step))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["fit"])
    parser.add_argument("--config")
    parser.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, required=True)
    parser.add_argument("--trainer.devices", dest="devices", type=int, required=True)
    parser.add_argument("--trainer.default_root_dir", dest="root", required=True)
    parser.add_argument("--trainer.max_steps", dest="max_steps", type=int, default=20)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--step_seconds", type=float, default=0.3)
    args = parser.parse_args()
    root = Path(args.root)
    ckpt = resolve_auto_ckpt(root) if args.ckpt_path == "auto" else args.ckpt_path

    L.seed_everything(0)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g))
    model = Toy(args.step_seconds)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        num_nodes=args.num_nodes,
        devices=args.devices,
        max_steps=args.max_steps,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SlurmRequeue()],
    )
    if trainer.is_global_zero:
        print(f"toy: world {trainer.world_size} resuming from {ckpt}", flush=True)
    trainer.fit(model, DataLoader(data, batch_size=2, shuffle=False), ckpt_path=ckpt)
    if trainer.is_global_zero:
        torch.save(model.net.state_dict(), root / "final.pt")
        result = {"global_step": trainer.global_step, "resumed_from": ckpt, "world_size": trainer.world_size}
        (root / "result.json").write_text(json.dumps(result))
        print(f"toy: done at step {trainer.global_step} (pid {os.getpid()})", flush=True)
    close_process_group()  # as brushnet-train does after a finished run


if __name__ == "__main__":
    main()
