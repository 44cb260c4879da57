"""The README's picture of a tiny base: ``python -m brushnet.testing.base_figure [FOLDER] --out PNG``.

Three rows of 64 px panels, upscaled x2 (nearest): held-out photo crops, their VAE reconstructions (posterior
mean), and unconditional samples (empty prompt, DDIM 20 steps, seed 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from brushnet.testing.base_quality import sample_images
from brushnet.testing.photos import HELD_OUT_PHOTOS, PhotoCrops
from brushnet.testing.tiny_base import ASSET


@torch.no_grad()
def base_figure(folder: str | Path, n: int = 8, size: int = 64, scale: int = 2) -> np.ndarray:
    """uint8 (3 * size * scale) x (n * size * scale) x 3: crops / reconstructions / samples."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    crops = PhotoCrops(HELD_OUT_PHOTOS, size).sample(n, np.random.default_rng(0))[0]
    rec = vae.decode(vae.encode(torch.from_numpy(crops)).latent_dist.mean).sample.clamp(-1, 1).numpy()
    rows = [crops, rec, sample_images(folder, n=n, size=size)]
    grid = np.concatenate([np.concatenate(list(r.transpose(0, 2, 3, 1)), axis=1) for r in rows], axis=0)
    grid = ((grid + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def main(argv: list[str] | None = None) -> int:
    import PIL.Image

    from brushnet.atomic import save_image_atomic

    parser = argparse.ArgumentParser(prog="python -m brushnet.testing.base_figure", description=__doc__)
    parser.add_argument("folder", type=Path, nargs="?", default=ASSET)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.folder / "vae").is_dir():
        parser.error(f"{args.folder} is not a diffusers base folder (no vae/ in it)")
    save_image_atomic(PIL.Image.fromarray(base_figure(args.folder)), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
