"""Quality numbers of a tiny base (``recipe.json`` records them; the tests compare them): held-out VAE PSNR,
held-out denoising loss of the UNet, and statistics of unconditional samples against photo crops and noise."""

from __future__ import annotations

import os

import numpy as np
import torch

from brushnet.testing.photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, image_statistics, psnr

# Fixed timesteps of the held-out loss: the whole schedule, where the sampler spends its steps.
LOSS_TIMESTEPS = (50, 150, 300, 450, 600, 750, 900)


@torch.no_grad()
def sample_images(
    folder: str | os.PathLike, n: int = 8, steps: int = 20, seed: int = 0, size: int = 64
) -> np.ndarray:
    """``n`` unconditional (empty-prompt) samples of a base, float NCHW in [-1, 1] (DDIM, ``steps`` steps):
    SD 1.5 or SDXL, whichever pipeline ``model_index.json`` names."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [""] * n,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return images.transpose(0, 3, 1, 2) * 2.0 - 1.0


@torch.no_grad()
def vae_held_out_psnr(folder: str | os.PathLike, n: int = 64, seed: int = 0, size: int = 64) -> float:
    """PSNR (dB) of the VAE's reconstructions (posterior mean) of random crops of the held-out photos."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    x = PhotoCrops(HELD_OUT_PHOTOS, size).sample(n, np.random.default_rng(seed))[0]
    rec = vae.decode(vae.encode(torch.from_numpy(x)).latent_dist.mean).sample.clamp(-1, 1).numpy()
    return psnr(rec, x)


def evaluate(folder: str | os.PathLike, size: int = 64) -> dict:
    """Held-out VAE PSNR and UNet loss, and statistics of unconditional samples next to those of
    training-photo crops and of Gaussian noise with the same std."""
    photos = PhotoCrops(TRAIN_PHOTOS, size).sample(64, np.random.default_rng(1))[0]
    samples = sample_images(folder, size=size)
    noise = np.random.default_rng(0).normal(0, photos.std(), photos.shape).clip(-1, 1)
    return {
        "vae_held_out_psnr_db": round(vae_held_out_psnr(folder, size=size), 2),
        "unet_held_out_loss": round(unet_held_out_loss(folder, size=size), 4),
        "samples": {k: round(v, 4) for k, v in image_statistics(samples).items()},
        "photo_crops": {k: round(v, 4) for k, v in image_statistics(photos).items()},
        "gaussian_noise": {k: round(v, 4) for k, v in image_statistics(noise).items()},
    }


@torch.no_grad()
def unet_held_out_loss(folder: str | os.PathLike, n: int = 64, seed: int = 0, size: int = 64) -> float:
    """Mean noise-prediction MSE of the UNet on held-out crops (VAE posterior means, empty prompt), over
    :data:`LOSS_TIMESTEPS` with fixed noise: how well the diffusion model knows photos it never saw."""
    from brushnet.conditioning import CaptionTokenizers, sdxl_time_ids, text_conditioning
    from brushnet.loading import load_base_components

    parts = load_base_components(folder)
    vae, unet, scheduler = parts.vae.eval(), parts.unet.eval(), parts.scheduler
    x = PhotoCrops(HELD_OUT_PHOTOS, size).sample(n, np.random.default_rng(seed))[0]
    latents = vae.encode(torch.from_numpy(x)).latent_dist.mean * vae.config.scaling_factor
    tokens = CaptionTokenizers(parts.tokenizer, parts.tokenizer_2)([""] * n)
    # SDXL: the pipeline's default micro-conditioning at this size (original = target, corner 0, 0)
    time_ids = sdxl_time_ids(
        torch.tensor([[size, size]] * n), torch.zeros(n, 2, dtype=torch.int64), (size, size)
    )
    cond = text_conditioning(
        parts.text_encoder.eval(),
        tokens,
        parts.text_encoder_2,
        time_ids=time_ids if parts.is_sdxl else None,
        dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for t in LOSS_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.full((n,), t)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(
            noisy, timesteps, cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs
        ).sample
        losses.append(float(((pred - noise) ** 2).mean()))
    return float(np.mean(losses))
