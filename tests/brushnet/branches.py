"""Test helper: a BrushNet branch for a tiny base, saved as a diffusers folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from brushnet import BrushNetModel


def save_branch(base: Path, out: Path, seed: int | None = 0) -> Path:
    """Clone a branch from ``base``'s UNet and save it to ``out``.

    ``seed=None`` keeps the zero-initialised output convs (the branch then adds exactly nothing); a seed
    fills them with small random weights so the branch changes the UNet's prediction.
    """
    branch = BrushNetModel.from_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        convs = [*branch.brushnet_down_blocks, branch.brushnet_mid_block, *branch.brushnet_up_blocks]
        with torch.no_grad():
            for conv in convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
    branch.save_pretrained(out)
    return out
