"""Shared test inputs for the DiT branches: a base transformer loaded from its folder, a batch, randomisation."""

from __future__ import annotations

from pathlib import Path

import torch

from brushnet.dit.family import FAMILIES
from brushnet.dit.text import DiTText


def load_transformer(folder: Path):
    """The base transformer the way a user loads it: ``from_pretrained(folder, subfolder="transformer")``."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    name = (folder / "transformer" / "config.json").read_text()
    cls = SD3Transformer2DModel if "SD3Transformer2DModel" in name else FluxTransformer2DModel
    return cls.from_pretrained(folder, subfolder="transformer").eval()


def batch(family: str, transformer, seed: int = 0, size: int = 8) -> dict:
    """Noisy latents, masked latents, keep mask, sigma, random text conditioning (B = 2, latent size x size)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    keep = (torch.rand(2, 1, size, size, generator=g) > 0.4).float()
    if family == "sd3":
        text = DiTText(
            torch.randn(2, 7, cfg.joint_attention_dim, generator=g),
            torch.randn(2, cfg.pooled_projection_dim, generator=g),
        )
    else:
        text = DiTText(
            torch.randn(2, 5, cfg.joint_attention_dim, generator=g),
            torch.randn(2, cfg.pooled_projection_dim, generator=g),
            torch.zeros(5, 3),
        )
    return dict(
        noisy=torch.randn(2, 16, size, size, generator=g),
        masked_latents=torch.randn(2, 16, size, size, generator=g),
        keep=keep,
        sigma=torch.tensor([0.7, 0.3]),
        text=text,
        guidance=3.5,
    )


def residuals(family: str, branch, b: dict, conditioning_scale=1.0):
    return FAMILIES[family].residuals(branch, **b, conditioning_scale=conditioning_scale)


def predict(family: str, transformer, b: dict, res=None):
    return FAMILIES[family].predict(
        transformer, b["noisy"], b["sigma"], b["text"], res, guidance=b["guidance"]
    )


def randomise_outputs(branch, seed: int = 1, std: float = 0.1) -> None:
    """Give the zero-initialised output linears random weights (a 'trained' branch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch.brushnet_blocks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
