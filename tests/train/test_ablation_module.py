"""Each ablation switch of the training module: builds, trains one step, exports, reloads and inpaints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from brushnet import BrushNetInpaintPipeline, BrushNetModel
from brushnet.single_branch import inpaint_single_branch
from tests.train.batches import make_batch
from train.module import BrushNetTrainingModule
from train.optim import build_optimizer

SWITCHES = {
    "half": {"injection": "half"},
    "controlnet": {"injection": "controlnet"},
    "conv": {"condition_encoder": "conv"},
    "cross_attention": {"branch_cross_attention": True},
    "single_branch": {"single_branch": True},
}


def _step(module: BrushNetTrainingModule, batch: dict) -> tuple[float, float]:
    opt = build_optimizer(module.brushnet.parameters(), "adamw", lr=1e-3, weight_decay=0.0)
    before = module.compute_loss(batch, torch.Generator().manual_seed(0))
    before.backward()
    opt.step()
    with torch.no_grad():
        after = module.compute_loss(batch, torch.Generator().manual_seed(0))
    return before.item(), after.item()


def _image_and_mask(size: int = 64):
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[8:24, 8:24] = True
    return image, mask


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_trains_one_step_saves_reloads_and_inpaints(tiny_base_sd15, tmp_path, name):
    module = BrushNetTrainingModule(str(tiny_base_sd15), optimizer="adamw", **SWITCHES[name])
    module.train()
    batch = make_batch(module.tokenizer, size=32)
    with torch.no_grad():
        base_alone = module.compute_loss(batch, torch.Generator().manual_seed(0), use_branch=False).item()
    before, after = _step(module, batch)
    assert before == pytest.approx(base_alone, rel=1e-5, abs=1e-6)  # zero-initialised: starts at the base
    assert after != before  # the step changed what the model predicts
    assert all(p.grad is None for p in module.unet.parameters())  # the frozen UNet gets no gradient

    module.brushnet.save_pretrained(tmp_path / "export")
    image, mask = _image_and_mask()
    if name == "single_branch":
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "export")
        assert unet.config.in_channels == 9
        pipe = StableDiffusionInpaintPipeline.from_pretrained(
            tiny_base_sd15, unet=unet, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        result = inpaint_single_branch(pipe, "a ball", image, mask, steps=2)
        assert result.shape == image.shape and result.dtype == np.uint8
        far = _far_from(mask)
        assert far.sum() > 1000 and np.array_equal(result[far], image[far])  # blended like BrushNet
        with pytest.raises(ValueError, match="single_branch"):
            module.inference_pipeline()
        return
    branch = BrushNetModel.from_pretrained(tmp_path / "export")
    for key, value in SWITCHES[name].items():
        if key in ("injection", "condition_encoder"):
            assert branch.config[key] == value
    assert branch.has_cross_attention == (name == "cross_attention")
    pipe = BrushNetInpaintPipeline.from_base(tiny_base_sd15, tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a ball", image, mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert np.asarray(out.images[0]).shape == image.shape


def _far_from(mask: np.ndarray, margin: int = 11) -> np.ndarray:
    """Pixels more than ``margin`` px (in both axes) from every mask pixel: blending leaves them alone."""
    rows, cols = np.nonzero(mask)
    far = np.ones_like(mask)
    far[
        max(rows.min() - margin, 0) : rows.max() + margin + 1,
        max(cols.min() - margin, 0) : cols.max() + margin + 1,
    ] = False
    return far
