"""Tiny SD 1.5- and SDXL-layout bases that really generate: VAE + UNet trained on CPU on real photographs.

``python -m brushnet.testing.tiny_base pretrain --out DIR`` trains, from random crops of the training photos of
:mod:`brushnet.testing.photos` (flips, several scales):

1. a 4-channel ``AutoencoderKL`` with a x4 spatial factor (64 px -> 16 x 16 latents), L1 + MSE + tiny KL;
2. a ``UNet2DConditionModel`` (cross-attention down/up blocks like SD 1.5, epsilon prediction, SD's
   DDPM schedule) on those latents, conditioned on captions through the tiny CLIP text encoder (real CLIP
   BPE tokenizer, random frozen weights as in :mod:`brushnet.testing.tiny`), 10 % empty captions;
3. more decoder steps with the encoder frozen (sharper reconstructions; the latents, hence the UNet, unchanged);

and saves a normal diffusers ``StableDiffusionPipeline`` folder plus ``recipe.json`` (seed, settings, timings,
the UNet's loss every 100 steps and the quality numbers of :func:`evaluate`), weights stored in fp16 (loaded
as fp32). ``--layout sdxl --vae-from <SD 1.5 tiny base>`` makes a ``StableDiffusionXLPipeline`` instead: SDXL's
block pattern and micro-conditioning, a second (projecting) text encoder, the given base's VAE reused (stages 1
and 3 skipped). The folders made with the default recipe (seed 0, one torch thread: on a busy 2-core machine
one thread ran 7x faster than two) and with ``--layout sdxl`` from it are shipped in
``brushnet/testing/assets/``; :func:`pretrained_tiny_base` returns their paths. ``verify FOLDER`` reruns the
first UNet steps of a folder's recorded recipe and compares the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from brushnet.testing.base_quality import evaluate
from brushnet.testing.photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops
from brushnet.testing.tiny_base_stages import (
    LAYOUTS,
    TEXT_HIDDEN,
    Recipe,
    finetune_decoder,
    train_unet,
    train_vae,
    unet_config,
)

ASSET = Path(__file__).parent / "assets" / "tiny_sd15_photos"
ASSET_SDXL = Path(__file__).parent / "assets" / "tiny_sdxl_photos"


def _components(recipe: Recipe, tmp: Path):
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from brushnet.testing.tiny import _text_encoder, write_clip_tokenizer

    write_clip_tokenizer(tmp / "_tok", "clip")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "_tok")
    torch.manual_seed(recipe.seed)
    text_encoder = _text_encoder(len(tokenizer), TEXT_HIDDEN, with_projection=False).eval()
    text_encoder_2 = None
    if recipe.layout == "sdxl":  # SDXL's second encoder: with the projection whose output is pooled
        text_encoder_2 = _text_encoder(len(tokenizer), TEXT_HIDDEN, with_projection=True).eval()
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
    return tokenizer, text_encoder, text_encoder_2, scheduler


def _train(recipe: Recipe, tmp: Path, log, loss_log: dict[int, float], stop_after: int | None = None):
    """The recipe's components, trained (``stop_after``: only that many UNet steps, no decoder fine-tune)."""
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(recipe.seed)
    crops = PhotoCrops(TRAIN_PHOTOS, recipe.size)
    tokenizer, text_encoder, text_encoder_2, scheduler = _components(recipe, tmp)
    t0 = time.perf_counter()
    if recipe.vae_from:
        vae = AutoencoderKL.from_pretrained(_vae_folder(recipe.vae_from), subfolder="vae").eval()
    else:
        vae = train_vae(recipe, crops, rng, log)
    t1 = time.perf_counter()
    unet = train_unet(
        recipe, vae, tokenizer, text_encoder, scheduler, crops, rng, log, text_encoder_2, loss_log, stop_after
    )
    t2 = time.perf_counter()
    if not recipe.vae_from and stop_after is None:
        vae = finetune_decoder(recipe, vae, crops, log)
    seconds = {
        "vae": round(t1 - t0, 1),
        "unet": round(t2 - t1, 1),
        "decoder": round(time.perf_counter() - t2, 1),
    }
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if text_encoder_2 is not None:
        parts.update(text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
    return parts, seconds


def _vae_folder(vae_from: str) -> Path:
    """``vae_from`` as given, or relative to the folder holding the ``brushnet`` package (what a shipped
    ``recipe.json`` records: ``brushnet/testing/assets/...``, valid from any working directory)."""
    path = Path(vae_from)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parents[2] / path


def pretrain(out: str | os.PathLike, recipe: Recipe | None = None, log=print) -> Path:
    """Train the tiny base and save it (atomically) as a diffusers pipeline folder at ``out``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    recipe = recipe or Recipe()
    unet_config(recipe.size, recipe.layout)  # an unknown layout fails before anything is written
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite a base model folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        loss_log: dict[int, float] = {}
        parts, seconds = _train(recipe, tmp, log, loss_log)
        if "text_encoder_2" in parts:
            pipe = StableDiffusionXLPipeline(**parts)
        else:
            pipe = StableDiffusionPipeline(
                **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipe.save_pretrained(tmp / "base")
        store_weights_fp16(tmp / "base")
        quality = evaluate(tmp / "base", size=recipe.size)
        info = {
            "recipe": asdict(recipe),
            "train_photos": list(TRAIN_PHOTOS),
            "held_out_photos": list(HELD_OUT_PHOTOS),
            "seconds": seconds,
            "torch": torch.__version__,
            "quality": quality,
            "unet_loss_log": {str(k): v for k, v in loss_log.items()},
        }
        (tmp / "base" / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp / "base", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(previous_threads)
    return out


# Relative tolerance of a rerun loss against the recorded one: on the machine that made a base the rerun is
# bit-exact; another CPU's kernels may round differently, while a changed recipe moves losses by >10 %.
VERIFY_RTOL = 0.02


def verify(folder: str | os.PathLike, unet_steps: int = 300, log=print) -> list[str]:
    """Rerun the recipe ``folder/recipe.json`` records for its first ``unet_steps`` UNet steps (after the
    whole VAE stage) and compare the losses with its ``unet_loss_log``; returns the mismatches (none: the
    code still makes this base). A folder without such a record raises ``ValueError``."""
    path = Path(folder) / "recipe.json"
    try:
        info = json.loads(path.read_text())
        recipe = Recipe(**info["recipe"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tiny base recipe ({type(e).__name__}: {e})") from None
    if "unet_loss_log" not in info:
        raise ValueError(f"{path} records no unet_loss_log (made before it was recorded)")
    recorded = {int(k): v for k, v in info["unet_loss_log"].items() if int(k) < unet_steps}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    got: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            _train(recipe, Path(tmp), log, got, stop_after=unet_steps)
        finally:
            torch.set_num_threads(previous_threads)
    return [
        f"unet step {step}: loss {got.get(step)} but recorded {want:.6f}"
        for step, want in sorted(recorded.items())
        if step not in got or abs(got[step] - want) > VERIFY_RTOL * abs(want)
    ]


def store_weights_fp16(folder: Path) -> None:
    """Rewrite every safetensors file of ``folder`` in fp16 (half the size in the repository). diffusers and
    transformers load them into the fp32 models their configs build unless ``torch_dtype`` says otherwise."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.rglob("*.safetensors")):
        state = load_file(path)
        save_file({k: v.half().contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})


def pretrained_tiny_base(layout: str = "sd15") -> Path:
    """The shipped tiny generating base (diffusers folder) of ``layout``, made by ``pretrain`` with the
    recipe its ``recipe.json`` records (SD 1.5: the default one)."""
    folder = {"sd15": ASSET, "sdxl": ASSET_SDXL}.get(layout)
    if folder is None:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not (folder / "model_index.json").is_file():
        how = "" if layout == "sd15" else f" --layout sdxl --vae-from {ASSET}"
        raise FileNotFoundError(
            f"the shipped tiny base {folder} is missing; rebuild it with "
            f"`python -m brushnet.testing.tiny_base pretrain --out {folder}{how}`"
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m brushnet.testing.tiny_base", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train a tiny base from photos and save it as a diffusers folder")
    p.add_argument("--out", type=Path, required=True, help="the new folder (must not exist)")
    for field, value in asdict(Recipe()).items():
        choices = LAYOUTS if field == "layout" else None
        p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value, choices=choices)
    e = sub.add_parser("evaluate", help="print the quality numbers of a base folder as JSON")
    e.add_argument("folder", type=Path, nargs="?", default=ASSET)
    v = sub.add_parser(
        "verify", help="rerun the first UNet steps of a folder's recipe; exit 1 if they differ"
    )
    v.add_argument("folder", type=Path)
    v.add_argument("--unet-steps", type=int, default=300)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        print(json.dumps(evaluate(args.folder), indent=2))
        return 0
    if args.command == "verify":
        try:
            problems = verify(args.folder, args.unet_steps)
        except ValueError as e:
            print(f"tiny_base verify: error: {e}", file=sys.stderr)
            return 2
        for line in problems:
            print(f"tiny_base verify: {line}", file=sys.stderr)
        if not problems:
            print(f"{args.folder}: the first {args.unet_steps} UNet steps reproduce the recorded losses")
        return 1 if problems else 0
    recipe = Recipe(**{f: getattr(args, f) for f in asdict(Recipe())})
    folder = pretrain(args.out, recipe)
    print((folder / "recipe.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
