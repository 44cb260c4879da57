"""Every config in configs/ parses with the training CLI: the family bases, the experiments that include
them (``config: base/<family>.yaml`` + dotted keys), and the FSDP overlays composed after tiny_cpu.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.cli import BrushNetCLI

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINING = sorted(p for p in CONFIGS.glob("*.yaml") if p.name not in ("fsdp.yaml", "fsdp_cpu.yaml"))
BASES = sorted((CONFIGS / "base").glob("*.yaml"))
EXPERIMENTS = [p for p in TRAINING if "config" in yaml.safe_load(p.read_text())]


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


@pytest.mark.parametrize("config", TRAINING + BASES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_config_parses(config):
    cfg = parse(config)
    assert cfg.model.pretrained_model_name_or_path
    assert cfg.data.tokenizer == cfg.model.pretrained_model_name_or_path  # linked


def _namespace_dict(cfg) -> dict:
    d = cfg.clone().as_dict()
    d.pop("config", None)
    return d


def test_experiments_are_small_overlays_on_a_family_base():
    assert {p.name for p in EXPERIMENTS} >= {
        "sd15_segmentation_mask.yaml",
        "sd15_random_mask.yaml",
        "sd2_vpred.yaml",
        "sdxl_segmentation_mask.yaml",
    }
    for path in EXPERIMENTS:
        overlay = yaml.safe_load(path.read_text())
        base = (path.parent / overlay.pop("config")).resolve()
        tiny = path.name.startswith("tiny_cpu_") and base == CONFIGS / "tiny_cpu.yaml"  # tiny DiT bases
        assert (base.parent == CONFIGS / "base" or tiny) and base.is_file(), path.name
        assert len(path.read_text().splitlines()) < 15, f"{path.name}: an overlay, not a copy"
        # every key is dotted: a nested block would replace the base's whole block (siblings -> defaults)
        assert overlay and not any(isinstance(v, dict) for v in overlay.values()), path.name
        # the base with exactly the overlay's keys changed, as if given on the command line
        as_arguments = tuple(f"--{key}={value}" for key, value in overlay.items())
        assert _namespace_dict(parse(path)) == _namespace_dict(parse(base, extra=as_arguments)), path.name


def test_random_mask_differs_from_segmentation_mask_in_one_value_and_the_names():
    seg, rnd = (
        yaml.safe_load((CONFIGS / f"sd15_{k}.yaml").read_text()) for k in ("segmentation_mask", "random_mask")
    )
    assert seg["config"] == rnd["config"] == "base/sd15.yaml"
    changed = {k for k in seg.keys() | rnd.keys() if seg.get(k) != rnd.get(k)}
    assert changed == {"data.random_mask_prob", "trainer.default_root_dir", "trainer.logger.init_args.name"}
    assert (seg["data.random_mask_prob"], rnd["data.random_mask_prob"]) == (0.0, 1.0)


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
    """The installed ``brushnet-train``, as a user runs it: exit status 2, the key, the value, the choices."""
    script = Path(sys.executable).with_name("brushnet-train")
    bad = [str(script), "fit", "--config", str(CONFIGS / "tiny_cpu.yaml"), "--model.optimizer=sgd"]
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr[proc.stderr.rindex("model.optimizer") :]
    assert "sgd" in error and "adamw8bit" in error, proc.stderr[-2000:]
