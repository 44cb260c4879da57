"""The in-training benchmark evaluation callback logs the available metrics every N steps."""

from __future__ import annotations

import copy
import csv
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from brushnet.loading import load_base_components
from tests.brushnet.branches import save_branch
from tests.brushnet.evaluation_builders import fake_benchmark
from train.eval_callback import BenchmarkEvalCallback
from train.family_unet import UNetParts
from train.module import BrushNetTrainingModule


class TinyModule(L.LightningModule):
    inference_pipeline = BrushNetTrainingModule.inference_pipeline  # the trainer's, on a lighter module
    parts = UNetParts  # what that method delegates to (its pipeline() is a static method)

    def __init__(self, base, branch_path):
        super().__init__()
        from brushnet import BrushNetModel

        parts = load_base_components(base)
        self.unet, self.vae, self.text_encoder = parts.unet, parts.vae, parts.text_encoder
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.scheduler
        self.text_encoder_2, self.tokenizer_2, self.ema = None, None, None
        self.brushnet = BrushNetModel.from_pretrained(branch_path).train()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch[0]) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def test_callback_logs_eval_metrics_every_n_steps(tmp_path, tiny_base_sd15):
    bench = fake_benchmark(tmp_path / "bench", n=1)
    module = TinyModule(tiny_base_sd15, save_branch(tiny_base_sd15, tmp_path / "branch"))
    callback = BenchmarkEvalCallback(
        bench, every_n_steps=2, num_images=1, steps=1, guidance=1.0, blended=True
    )
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs", name="run")
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    data = DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=1)
    trainer.fit(module, data)
    assert module.brushnet.training  # restored after the evaluation
    metrics = callback.last_metrics
    assert {"eval/psnr", "eval/psnr_official", "eval/mse", "eval/mse_official"} <= set(metrics)
    assert "eval/clip_similarity" not in metrics  # no weights configured -> not logged
    assert math.isfinite(metrics["eval/psnr"]) and metrics["eval/psnr"] > 20  # blended: kept region preserved
    logger.save()
    with open(logger.experiment.metrics_file_path) as f:
        logged = [r for r in csv.DictReader(f) if r.get("eval/psnr")]
    assert [int(r["step"]) for r in logged] == [2]  # once, at step 2 of 3
    assert float(logged[0]["eval/psnr"]) == pytest.approx(metrics["eval/psnr"])


def test_missing_components_are_named(tmp_path):
    bench = fake_benchmark(tmp_path / "bench", n=1)
    callback = BenchmarkEvalCallback(bench, num_images=1)
    with pytest.raises(AttributeError, match="pipeline_factory"):
        callback.evaluate(L.LightningModule())


def test_pipeline_uses_the_ema_branch_when_asked(tmp_path, tiny_base_sd15):
    module = TinyModule(tiny_base_sd15, save_branch(tiny_base_sd15, tmp_path / "branch"))
    assert module.inference_pipeline().brushnet is module.brushnet  # no EMA
    module.ema = copy.deepcopy(module.brushnet).eval()
    assert module.inference_pipeline().brushnet is module.ema
    assert module.inference_pipeline(use_ema=False).brushnet is module.brushnet
    pipe = module.inference_pipeline(scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.unet is module.unet
