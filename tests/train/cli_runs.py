"""Helpers for tests that run the training CLI on tiny data: a config overlay and the arguments."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.train.data_builders import write_shards

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def tiny_data(folder: Path) -> Path:
    """Two shards of 6 real-photo samples each (48 x 64 px)."""
    if not any(folder.glob("*.tar")):
        write_shards(folder, [6, 6])
    return folder


def overlay(path: Path, *, every: int = 2, validate_every: int = 1000, ema: bool = True, **model) -> Path:
    """A config composed after tiny_cpu.yaml: 32 px, batch 2, checkpoint (+ export) every ``every`` steps."""
    cfg = {
        "model": {"ema_decay": 0.9 if ema else None, **model},
        "data": {"resolution": 32, "batch_size": 2, "num_workers": 0, "random_mask_prob": 0.5},
        "trainer": {
            "log_every_n_steps": 1,
            "callbacks": [
                {
                    "class_path": "train.checkpointing.BrushNetCheckpoint",
                    "init_args": {
                        "every_n_train_steps": every,
                        "save_top_k": 2,
                        "monitor": "step",
                        "mode": "max",
                        "filename": "step-{step:08d}",
                    },
                },
                {
                    "class_path": "train.validation.ValidationGrids",
                    "init_args": {
                        "every_n_steps": validate_every,
                        "resolution": 32,
                        "num_inference_steps": 2,
                        "guidance_scale": 1.0,
                        "samples": [
                            {
                                "image": "skimage:astronaut",
                                "mask": "box:0.25,0.25,0.75,0.75",
                                "prompt": "an astronaut",
                            }
                        ],
                    },
                },
                {"class_path": "train.monitor.TrainingMonitor"},
                {
                    "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                    "init_args": {"logging_interval": "step"},
                },
            ],
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_args(base: Path, data: Path, run: Path, extra_config: Path, *more: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(TINY_CONFIG),
        "--config",
        str(extra_config),
        "--model.pretrained_model_name_or_path",
        str(base),
        "--data.train_shards",
        str(data),
        f"--trainer.default_root_dir={run}",
        *more,
    ]
