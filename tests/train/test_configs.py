"""Every config in configs/ parses with the training CLI (the FSDP overlays composed after tiny_cpu.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.cli import BrushNetCLI, main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINING = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in ("fsdp.yaml", "fsdp_cpu.yaml"))


class _Parsed(Exception):
    def __init__(self, config):
        self.config = config


class ParseOnly(BrushNetCLI):
    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config)


def parse(*configs: Path, extra: tuple[str, ...] = ()):
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + list(extra)
    with pytest.raises(_Parsed) as parsed:
        from train.data import BrushDataModule
        from train.module import BrushNetTrainingModule

        ParseOnly(BrushNetTrainingModule, BrushDataModule, args=args, run=True)
    return parsed.value.config.fit


def test_all_training_configs_are_there():
    names = {p.name for p in TRAINING}
    assert {
        "sd15_segmentation_mask.yaml",
        "sd15_random_mask.yaml",
        "sdxl_segmentation_mask.yaml",
        "sd2_vpred.yaml",
        "tiny_cpu.yaml",
    } <= names


@pytest.mark.parametrize("config", TRAINING, ids=lambda p: p.name)
def test_config_parses(config):
    cfg = parse(config)
    assert cfg.model.pretrained_model_name_or_path
    assert cfg.data.tokenizer == cfg.model.pretrained_model_name_or_path  # linked


@pytest.mark.parametrize("overlay", ["fsdp.yaml", "fsdp_cpu.yaml"])
def test_fsdp_overlays_compose(overlay):
    cfg = parse(CONFIGS / "tiny_cpu.yaml", CONFIGS / overlay)
    assert cfg.trainer.strategy.class_path == "train.fsdp.FSDP2Strategy"


def test_official_hyperparameters():
    for name in ("sd15_segmentation_mask.yaml", "sd15_random_mask.yaml"):
        cfg = parse(CONFIGS / name)
        m, d = cfg.model, cfg.data
        assert (m.pretrained_model_name_or_path, m.learning_rate, m.lr_scheduler, m.optimizer) == (
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            1e-5,
            "constant",
            "adamw8bit",
        )
        assert (d.batch_size, d.resolution) == (2, 512)
    assert parse(CONFIGS / "sd15_random_mask.yaml").data.random_mask_prob == 1.0
    xl = parse(CONFIGS / "sdxl_segmentation_mask.yaml")
    assert (xl.data.resolution, xl.data.batch_size, xl.trainer.accumulate_grad_batches) == (1024, 1, 4)


def test_bad_value_is_named():
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--model.optimizer=sgd"])
