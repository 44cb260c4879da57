"""A tiny SD 1.5-layout base that really generates: VAE + UNet trained on CPU on real photographs.

``python -m brushnet.testing.tiny_base pretrain --out DIR`` trains, from random crops of the training photos of
:mod:`brushnet.testing.photos` (flips, several scales):

1. a 4-channel ``AutoencoderKL`` with a x4 spatial factor (64 px -> 16 x 16 latents), L1 + MSE + tiny KL;
2. a ``UNet2DConditionModel`` (cross-attention down/up blocks like SD 1.5, epsilon prediction, SD's
   DDPM schedule) on those latents, conditioned on captions through the tiny CLIP text encoder (real CLIP
   BPE tokenizer, random frozen weights as in :mod:`brushnet.testing.tiny`), 10 % empty captions;
3. more decoder steps with the encoder frozen (sharper reconstructions; the latents, hence the UNet, unchanged);

and saves a normal diffusers ``StableDiffusionPipeline`` folder plus ``recipe.json`` (seed, settings, timings
and the quality numbers of :func:`evaluate`), weights stored in fp16 (loaded as fp32). The folder made with the
default recipe (seed 0, one torch thread: on a busy 2-core machine one thread ran 7x faster than two) is shipped
in ``brushnet/testing/assets/``; :func:`pretrained_tiny_base` returns its path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brushnet.testing.base_quality import evaluate
from brushnet.testing.photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops

ASSET = Path(__file__).parent / "assets" / "tiny_sd15_photos"
TEXT_HIDDEN = 32


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


def unet_config(size: int) -> dict:
    """SD 1.5's block pattern (cross-attention down blocks, plain innermost down block) at tiny widths."""
    return dict(
        sample_size=size // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
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
def _text_embeddings(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids)[0]


def train_unet(recipe: Recipe, vae, tokenizer, text_encoder, scheduler, crops: PhotoCrops, rng, log=print):
    from diffusers import UNet2DConditionModel

    means, stds, captions = _encode_crops(vae, crops, recipe.latent_crops, rng)
    # SD sets scaling_factor so that scaled latents have unit variance (0.18215 for its VAE).
    scaling = float(1.0 / (means + stds * torch.randn_like(stds)).std())
    vae.register_to_config(scaling_factor=scaling)
    prompts = sorted(set(captions))
    table = _text_embeddings(tokenizer, text_encoder, ["", *prompts])
    caption_idx = torch.tensor([1 + prompts.index(c) for c in captions])

    torch.manual_seed(recipe.seed + 1)
    unet = UNet2DConditionModel(**unet_config(recipe.size))
    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe.unet_lr, total_steps=recipe.unet_steps, pct_start=0.05
    )
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    num_t = scheduler.config.num_train_timesteps
    unet.train()
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, len(means), (recipe.unet_batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(stds[idx].shape, generator=gen)) * scaling
        cond = caption_idx[idx].clone()
        cond[torch.rand(len(idx), generator=gen) < recipe.empty_prompt_prob] = 0
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, num_t, (len(idx),), generator=gen)
        pred = unet(scheduler.add_noise(latents, noise, t), t, table[cond]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, params, recipe.ema_decay if step > 100 else 0.0)
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step:5d} loss {loss.item():.4f} {time.perf_counter():.0f}s")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval()


def _components(recipe: Recipe, tmp: Path):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from brushnet.testing.tiny import _text_encoder, write_clip_tokenizer

    write_clip_tokenizer(tmp / "_tok", "clip")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "_tok")
    torch.manual_seed(recipe.seed)
    text_encoder = _text_encoder(len(tokenizer), TEXT_HIDDEN, with_projection=False).eval()
    # SD 1.5's training schedule (scheduler_config.json of the released model), as build_tiny_base.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return tokenizer, text_encoder, scheduler


def pretrain(out: str | os.PathLike, recipe: Recipe | None = None, log=print) -> Path:
    """Train the tiny base and save it (atomically) as a diffusers pipeline folder at ``out``."""
    from diffusers import StableDiffusionPipeline

    recipe = recipe or Recipe()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite a base model folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        rng = np.random.default_rng(recipe.seed)
        crops = PhotoCrops(TRAIN_PHOTOS, recipe.size)
        tokenizer, text_encoder, scheduler = _components(recipe, tmp)
        t0 = time.perf_counter()
        vae = train_vae(recipe, crops, rng, log)
        t1 = time.perf_counter()
        unet = train_unet(recipe, vae, tokenizer, text_encoder, scheduler, crops, rng, log)
        t2 = time.perf_counter()
        vae = finetune_decoder(recipe, vae, crops, log)
        t3 = time.perf_counter()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp / "base")
        store_weights_fp16(tmp / "base")
        quality = evaluate(tmp / "base", size=recipe.size)
        info = {
            "recipe": asdict(recipe),
            "train_photos": list(TRAIN_PHOTOS),
            "held_out_photos": list(HELD_OUT_PHOTOS),
            "seconds": {"vae": round(t1 - t0, 1), "unet": round(t2 - t1, 1), "decoder": round(t3 - t2, 1)},
            "torch": torch.__version__,
            "quality": quality,
        }
        (tmp / "base" / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp / "base", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(previous_threads)
    return out


def store_weights_fp16(folder: Path) -> None:
    """Rewrite every safetensors file of ``folder`` in fp16 (half the size in the repository). diffusers and
    transformers load them into the fp32 models their configs build unless ``torch_dtype`` says otherwise."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.rglob("*.safetensors")):
        state = load_file(path)
        save_file({k: v.half().contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def pretrained_tiny_base() -> Path:
    """The shipped tiny generating base (diffusers folder), made by ``pretrain`` with the default recipe."""
    if not (ASSET / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shipped tiny base {ASSET} is missing; rebuild it with "
            f"`python -m brushnet.testing.tiny_base pretrain --out {ASSET}`"
        )
    return ASSET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brushnet.testing.tiny_base", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train a tiny base from photos and save it as a diffusers folder")
    p.add_argument("--out", type=Path, required=True, help="the new folder (must not exist)")
    for field, value in asdict(Recipe()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    e = sub.add_parser("evaluate", help="print the quality numbers of a base folder as JSON")
    e.add_argument("folder", type=Path, nargs="?", default=ASSET)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        print(json.dumps(evaluate(args.folder), indent=2))
        return 0
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(Recipe())})
    folder = pretrain(args.out, recipe)
    print((folder / "recipe.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
