"""Latent-space helpers shared by the SD3 / Flux pipelines and training: VAE scaling, Flux packing, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vae_encode(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(VAE latent sample - shift_factor) * scaling_factor`` for pixels in [-1, 1] (SD3 / Flux convention)."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from latents scaled like :func:`vae_encode`."""
    shift = vae.config.get("shift_factor") or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype), return_dict=False)[0]


def latent_keep_mask(keep: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """A ``B x 1 x H x W`` keep mask (1 = keep) at latent size, nearest (as the UNet BrushNet pipeline)."""
    return F.interpolate(keep.float(), size=size_hw)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``B x C x h x w`` -> Flux tokens ``B x (h/2 * w/2) x 4C`` (2x2 patches; FluxPipeline._pack_latents order)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2x2 latent patches: latent size {h}x{w} must be even")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack` for a latent of size ``size_hw``."""
    b, _, c4 = tokens.shape
    h, w = size_hw
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(size_hw: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux latent image ids ``(h/2 * w/2) x 3``: (0, row, column) per packed token (FluxPipeline's layout)."""
    h, w = size_hw[0] // 2, size_hw[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)
