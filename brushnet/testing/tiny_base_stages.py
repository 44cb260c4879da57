"""The tiny base's recipe and its training stages (:mod:`brushnet.testing.tiny_base` runs them): the VAE, the
diffusion UNet on cached crop latents, and the decoder fine-tune."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from brushnet.testing.photos import PhotoCrops

TEXT_HIDDEN = 32
LAYOUTS = ("sd15", "sdxl")


@dataclass
class Recipe:
    """Everything that decides the trained base (``recipe.json`` records it)."""

    seed: int = 0
    size: int = 64
    threads: int = 1
    vae_steps: int = 600
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    latent_crops: int = 16384
    unet_steps: int = 4000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    ema_decay: float = 0.99
    empty_prompt_prob: float = 0.1
    decoder_steps: int = 1000
    decoder_lr: float = 5e-4
    layout: str = "sd15"  # or "sdxl": the UNet's block pattern and text/micro-conditioning
    # a tiny base folder whose VAE to reuse (no VAE / decoder training); "": train one
    vae_from: str = ""


def vae_config(size: int) -> dict:
    """x4 VAE (3 levels): at 64 px a x8 VAE's 8 x 8 latents cannot hold a recognisable photo crop."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=size,
    )


def unet_config(size: int, layout: str = "sd15") -> dict:
    """SD 1.5's block pattern (cross-attention down blocks, plain innermost down block) at tiny widths; or
    SDXL's (plain outermost block, attention in the inner ones, linear projections, ``text_time`` added
    embedding of the pooled text embeds and 6 time ids: diffusers' SDXL ``unet/config.json``)."""
    common = dict(
        sample_size=size // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        attention_head_dim=8,
        norm_num_groups=16,
    )
    if layout == "sdxl":
        return dict(
            common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8,
        )
    if layout != "sd15":
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    return dict(
        common,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
    )


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


def train_vae(recipe: Recipe, crops: PhotoCrops, rng: np.random.Generator, log=print):
    from diffusers import AutoencoderKL

    torch.manual_seed(recipe.seed)
    vae = AutoencoderKL(**vae_config(recipe.size))
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe.vae_lr, total_steps=recipe.vae_steps, pct_start=0.05
    )
    vae.train()
    for step in range(recipe.vae_steps):
        x = torch.from_numpy(crops.sample(recipe.vae_batch, rng)[0])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step:5d} loss {loss.item():.4f} {time.perf_counter():.0f}s")
    return vae.eval()


def finetune_decoder(recipe: Recipe, vae, crops: PhotoCrops, log=print):
    """More decoder steps with the encoder frozen: sharper reconstructions, same latents (the UNet stays valid)."""
    rng = np.random.default_rng(recipe.seed + 3)
    torch.manual_seed(recipe.seed + 3)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe.decoder_lr, total_steps=max(recipe.decoder_steps, 1), pct_start=0.05
    )
    vae.decoder.train()
    for step in range(recipe.decoder_steps):
        x = torch.from_numpy(crops.sample(recipe.vae_batch, rng)[0])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.decoder_steps - 1:
            log(f"decoder step {step:5d} loss {loss.item():.4f} {time.perf_counter():.0f}s")
    return vae.eval()


@torch.no_grad()
def _encode_crops(vae, crops: PhotoCrops, n: int, rng: np.random.Generator):
    """Posterior means/stds of ``n`` random crops, and their captions (the UNet's fixed training set)."""
    means, stds, captions = [], [], []
    for start in range(0, n, 64):
        x, c = crops.sample(min(64, n - start), rng)
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        captions += c
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def _text_embeddings(tokenizer, text_encoder, prompts: list[str], text_encoder_2=None):
    """Per prompt, the UNet's ``encoder_hidden_states`` and (SDXL) pooled ``text_embeds`` (else None), as
    the trainer and the pipeline compute them (:func:`brushnet.conditioning.encode_text`)."""
    from brushnet.conditioning import encode_text, token_ids

    ids = token_ids(tokenizer, prompts)
    return encode_text(text_encoder, ids, text_encoder_2, ids if text_encoder_2 is not None else None)


def train_unet(
    recipe: Recipe,
    vae,
    tokenizer,
    text_encoder,
    scheduler,
    crops: PhotoCrops,
    rng,
    log=print,
    text_encoder_2=None,
    loss_log: dict[int, float] | None = None,
    stop_after: int | None = None,
):
    """The diffusion model on cached crop latents; ``loss_log`` gets the loss of every 100th step (and the
    last); ``stop_after`` ends the loop early, the schedule unchanged (:func:`verify`)."""
    from diffusers import UNet2DConditionModel

    from brushnet.conditioning import sdxl_time_ids

    means, stds, captions = _encode_crops(vae, crops, recipe.latent_crops, rng)
    if recipe.vae_from:
        scaling = float(vae.config.scaling_factor)  # the reused VAE's, so its latents mean the same
    else:
        # SD sets scaling_factor so that scaled latents have unit variance (0.18215 for its VAE).
        scaling = float(1.0 / (means + stds * torch.randn_like(stds)).std())
        vae.register_to_config(scaling_factor=scaling)
    prompts = sorted(set(captions))
    table, pooled = _text_embeddings(tokenizer, text_encoder, ["", *prompts], text_encoder_2)
    caption_idx = torch.tensor([1 + prompts.index(c) for c in captions])
    time_ids = None
    if pooled is not None:
        # SDXL's size / crop micro-conditioning drawn at random per crop (sizes 64-512, corners 0-64), so the
        # UNet learns to ignore it and takes whatever the trainer or the pipeline passes. With 8 photos a
        # real value tells which photo or zoom level a crop is: with the resized photo's size as original
        # size the held-out loss was 0.51 at the pipeline's default (64, 64) and 0.25 at (128, 128).
        g = torch.Generator().manual_seed(recipe.seed + 5)
        original = torch.randint(64, 513, (len(means), 2), generator=g)
        corner = torch.randint(0, 65, (len(means), 2), generator=g)
        time_ids = sdxl_time_ids(original, corner, (recipe.size, recipe.size)).float()

    torch.manual_seed(recipe.seed + 1)
    unet = UNet2DConditionModel(**unet_config(recipe.size, recipe.layout))
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe.unet_lr, total_steps=recipe.unet_steps, pct_start=0.05
    )
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    num_t = scheduler.config.num_train_timesteps
    unet.train()
    for step in range(recipe.unet_steps if stop_after is None else min(stop_after, recipe.unet_steps)):
        idx = torch.randint(0, len(means), (recipe.unet_batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(stds[idx].shape, generator=gen)) * scaling
        cond = caption_idx[idx].clone()
        cond[torch.rand(len(idx), generator=gen) < recipe.empty_prompt_prob] = 0
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, num_t, (len(idx),), generator=gen)
        added = None if pooled is None else {"text_embeds": pooled[cond], "time_ids": time_ids[idx]}
        pred = unet(scheduler.add_noise(latents, noise, t), t, table[cond], added_cond_kwargs=added).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, params, recipe.ema_decay if step > 100 else 0.0)
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step:5d} loss {loss.item():.4f} {time.perf_counter():.0f}s")
            if loss_log is not None:
                loss_log[step] = loss.item()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval()
