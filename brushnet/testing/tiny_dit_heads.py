"""Tiny DiT bases with a trained VAE's near-deterministic posterior (training demos and tests).

A random ``AutoencoderKL``'s posterior is mostly noise: on the tiny SD3 / Flux bases (32 px) the posterior
mean has std 0.30 and the posterior std is 1.04, so the training latent ``x_0`` (one sample, times SD3's
scaling factor 1.53) is mostly a fresh draw that neither the noisy latent nor the masked-image latent (another
draw) can tell: the velocity target ``noise - x_0`` is unpredictable and a training run's loss barely moves
(tiny SD3, 300 steps: 3.93 -> 3.71). A trained VAE's posterior std is tiny; setting the log-variance half of
``vae.encoder.conv_out`` to a constant :data:`LOGVAR` gives the tiny VAE that property and changes nothing
else (the posterior mean, the decoder, the transformer, the text encoders are as built).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from brushnet.testing.tiny_dit import build_tiny_flux_base, build_tiny_sd3_base

LOGVAR = -12.0  # posterior std exp(-6) ~ 0.0025


def sharpen_vae_posterior(base: str | os.PathLike, logvar: float = LOGVAR) -> Path:
    """Give the VAE of the base folder ``base`` the constant posterior log-variance ``logvar`` (atomically)."""
    from diffusers import AutoencoderKL

    from brushnet.atomic import atomic_folder

    folder = Path(base)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    conv = vae.encoder.conv_out  # 2 x latent_channels outputs: mean, then log-variance (DiagonalGaussian)
    half = vae.config.latent_channels
    with torch.no_grad():
        conv.weight[half:] = 0.0
        conv.bias[half:] = logvar
    with atomic_folder(folder / "vae") as tmp:
        vae.save_pretrained(tmp)
    return folder


def build_trainable_dit_base(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny ``"sd3"`` or ``"flux"`` base of :mod:`brushnet.testing.tiny_dit` with a sharp VAE posterior."""
    builders = {"sd3": build_tiny_sd3_base, "flux": build_tiny_flux_base}
    if family not in builders:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {sorted(builders)}")
    return sharpen_vae_posterior(builders[family](path, seed=seed))
