"""The data position saved by ``BrushDataModule`` inside real Lightning checkpoints: a run resumed from a
step checkpoint at step k (mid-epoch, last batch of an epoch, second epoch) sees exactly the batches the
uninterrupted run saw after step k, with DataLoader workers.

(Checkpoints saved in ``on_train_epoch_end`` are not tested: Lightning 2.6 itself runs one extra batch after
resuming from them, with any DataLoader; Lightning-AI/pytorch-lightning#19403.)"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.train.data_builders import tokenizer_folder, write_shards
from train.data import BrushDataModule

STEPS = 14  # 13 samples, batch 2 -> 6 batches per epoch: crosses two epoch boundaries


class KeyRecorder(L.LightningModule):
    """Stand-in for the BrushNet module: a linear layer on the batch, recording the keys it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[str, ...]] = []
        self.pixel_sums: list[float] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["keys"]))
        self.pixel_sums.append(float(batch["pixel_values"].sum()))
        assert batch["pixel_values"].dtype == torch.float32  # normalised by the DataModule after the transfer
        return self.layer(batch["conditioning_pixel_values"].mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(shards, tok, ckpt_dir, ckpt_path=None):
    model = KeyRecorder()
    dm = BrushDataModule(
        train_shards=[str(p) for p in shards],
        tokenizer=tok,
        resolution=32,
        batch_size=2,
        num_workers=2,
        seed=3,
    )
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)]
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert trainer.global_step == STEPS
    return model


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("k", [3, 6, 8])
def test_trainer_resume_sees_the_uninterrupted_batches(tmp_path_factory, k):
    root = tmp_path_factory.getbasetemp() / "lightning-resume"
    if not (root / "full.pt").exists():
        shards = write_shards(root / "shards", [5, 8])
        tok = str(tokenizer_folder(root / "tok"))
        full = fit(shards, tok, root / "ckpt")
        torch.save({"seen": full.seen, "sums": full.pixel_sums}, root / "full.pt")
    full = torch.load(root / "full.pt")
    assert len(full["seen"]) == STEPS and full["seen"][:6] != full["seen"][6:12]  # reshuffled per epoch
    ckpt = root / "ckpt" / f"step={k}.ckpt"
    state = torch.load(ckpt, weights_only=False)["BrushDataModule"]
    assert (state["epoch"], state["consumed_samples"]) == {3: (0, 6), 6: (0, 12), 8: (1, 4)}[k]
    resumed = fit(
        sorted((root / "shards").glob("*.tar")),
        str(root / "tok"),
        tmp_path_factory.mktemp("c"),
        ckpt_path=ckpt,
    )
    assert resumed.seen == full["seen"][k:]
    assert resumed.pixel_sums == full["sums"][k:]
