"""The single-branch baseline of the paper's "dual vs single branch" ablation: the SD-Inpainting recipe.

Instead of a branch beside a frozen UNet, the base UNet itself is fine-tuned with a 9-channel input
``[noisy latents (4), inpaint mask (1, 1 = inpaint), masked-image latents (4)]`` — the channel order and
mask polarity of diffusers' ``StableDiffusionInpaintPipeline`` (``num_channels_unet == 9``), so a trained
UNet folder runs there unchanged. The new input channels start at zero, so the fine-tune starts from the
base's prediction exactly. The masked image uses BrushNet's convention (hole = -1, black) in training and
in :func:`inpaint_single_branch`, which hands the pipeline those latents itself.
"""

from __future__ import annotations

import copy

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

from brushnet.masks import blurred_blend


def inpainting_unet_from(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A trainable copy of ``unet`` whose ``conv_in`` takes 9 channels (extra input weights zero)."""
    latent = unet.config.out_channels
    if unet.config.in_channels != latent:
        raise ValueError(
            f"expected a text-to-image UNet (in_channels == out_channels == {latent}), got in_channels="
            f"{unet.config.in_channels}: is it an inpainting UNet already?"
        )
    out = copy.deepcopy(unet)
    old = out.conv_in
    conv = torch.nn.Conv2d(2 * latent + 1, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :latent] = old.weight
        conv.bias.copy_(old.bias)
    out.conv_in = conv.to(old.weight.device, old.weight.dtype)
    out.register_to_config(in_channels=2 * latent + 1)
    return out


def single_branch_input(
    noisy: torch.Tensor, masked_latents: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The 9-channel UNet input; ``keep`` is the mask at pixel or latent size, 1 = keep (resized nearest)."""
    inpaint = 1.0 - F.interpolate(keep.float(), size=noisy.shape[-2:])
    return torch.cat([noisy, inpaint.to(noisy.dtype), masked_latents.to(noisy.dtype)], dim=1)


@torch.no_grad()
def inpaint_single_branch(
    pipe: StableDiffusionInpaintPipeline,
    prompt: str,
    image: np.ndarray,
    inpaint_mask: np.ndarray,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    blend: bool = True,
    blur_size: int = 21,
) -> np.ndarray:
    """Inpaint ``image`` (H x W x 3 uint8) where ``inpaint_mask`` is True, with BrushNet's masked image and
    (optionally) the same blurred blending as :class:`brushnet.BrushNetInpaintPipeline`."""
    h, w = image.shape[:2]
    keep = torch.from_numpy(~inpaint_mask.astype(bool))[None, None]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    masked = torch.where(keep, pixels, torch.tensor(-1.0))  # hole black, as in BrushNet training
    generator = torch.Generator().manual_seed(seed)
    vae = pipe.vae
    latents = vae.encode(masked.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    latents = latents * vae.config.scaling_factor
    out = pipe(
        prompt,
        image=PIL.Image.fromarray(image),
        mask_image=PIL.Image.fromarray(inpaint_mask.astype(np.uint8) * 255),
        masked_image_latents=latents,
        height=h,
        width=w,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="np",
    ).images[0]
    result = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    return blurred_blend(image, result, inpaint_mask.astype(bool), blur_size=blur_size) if blend else result
