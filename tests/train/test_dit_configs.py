"""The SD3.5 / Flux configs: they resolve with the training CLI to the released bases at 1024 px, the tiny
CPU ones to their tiny bases, and the per-GPU memory their comments give is what ``brushnet.dit.shapes``
computes today."""

from __future__ import annotations

import pytest

from brushnet.dit.shapes import memory_rows
from tests.train.test_configs import CONFIGS, parse

REAL = {
    "sd35_medium_segmentation_mask.yaml": (
        "stabilityai/stable-diffusion-3.5-medium",
        "base/sd35_medium.yaml",
    ),
    "flux_dev_segmentation_mask.yaml": ("black-forest-labs/FLUX.1-dev", "base/flux_dev.yaml"),
}
SHAPE = {"base/sd35_medium.yaml": "sd3.5-medium", "base/flux_dev.yaml": "flux.1-dev"}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dit_configs_resolve(name):
    hub_id, _ = REAL[name]
    cfg = parse(CONFIGS / name)
    assert cfg.model.pretrained_model_name_or_path == cfg.data.tokenizer == hub_id
    assert (cfg.data.resolution, cfg.data.batch_size, cfg.data.random_mask_prob) == (1024, 1, 0.0)
    assert (cfg.model.optimizer, cfg.model.gradient_checkpointing, cfg.trainer.precision) == (
        "adamw8bit",
        True,
        "bf16-mixed",
    )
    assert cfg.model.weighting_scheme == "logit_normal"
    if "flux" in name:
        assert cfg.model.flux_guidance == 3.5
    with_fsdp = parse(CONFIGS / name, CONFIGS / "fsdp.yaml")
    assert with_fsdp.trainer.strategy.class_path == "train.fsdp.FSDP2Strategy"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tiny_dit_configs_resolve_to_tiny_cpu_runs(family):
    cfg = parse(CONFIGS / f"tiny_cpu_{family}.yaml")
    tiny = parse(CONFIGS / "tiny_cpu.yaml")
    assert cfg.model.pretrained_model_name_or_path == f"demo/base_{family}"
    assert (cfg.trainer.accelerator, cfg.data.resolution, cfg.trainer.max_steps) == (
        tiny.trainer.accelerator,
        tiny.data.resolution,
        tiny.trainer.max_steps,
    )


@pytest.mark.parametrize("base", sorted(SHAPE))
def test_memory_comments_match_the_shape_table(base):
    text = (CONFIGS / base).read_text()
    rows = [r for r in memory_rows() if r["base"] == SHAPE[base]]
    assert len(rows) == 4
    for r in rows:
        total = r["branch_gib"] + r["base_gib"]
        line = next(
            ln
            for ln in text.splitlines()
            if ln.startswith("#") and f"{r['strategy']}, {r['optimizer']}:" in ln
        )
        after = line.split(f"{r['strategy']}, {r['optimizer']}:")[1].split("GiB /")
        assert after[0].strip() == f"{total:.1f}", (base, r)
        assert after[1].split("GiB")[0].strip() == f"{total + r['text_gib']:.1f}", (base, r)
