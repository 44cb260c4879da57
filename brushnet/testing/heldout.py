"""Masked-region error of an inpainting pipeline on crops of the held-out photos (never trained on).

Each case is a random square crop of a photo in :data:`brushnet.testing.photos.HELD_OUT_PHOTOS` with a random box hole
(25-50 % of each side). The score is the PSNR / MSE of the output *inside the hole* against the ground truth;
blending does not change those pixels (:func:`brushnet.masks.blurred_blend` keeps the hole exactly generated).
Every variant is run with the same seeds, so differences come from the branch alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from brushnet.model import BrushNetModel
from brushnet.testing.photos import HELD_OUT_PHOTOS, PhotoCrops


@dataclass
class HeldOutCase:
    image: np.ndarray  # uint8 HxWx3
    hole: np.ndarray  # bool HxW, True = inpaint
    caption: str


def held_out_cases(
    n: int = 16,
    size: int = 64,
    seed: int = 0,
    scales: tuple[float, ...] = (1.0,),
    photos: dict[str, str] = HELD_OUT_PHOTOS,
) -> list[HeldOutCase]:
    """``n`` deterministic (crop, box hole, caption) cases from the held-out photos (or other ``photos``,
    e.g. :data:`~brushnet.testing.photos.TRAIN_PHOTOS` to see what the models do on photos they know). The
    default scale (short side = ``size``, random square crop, random flip) is what the trainer's DataModule
    does to its photos."""
    rng = np.random.default_rng(seed)
    crops, captions = PhotoCrops(photos, size, scales).sample(n, rng)
    images = ((crops.transpose(0, 2, 3, 1) + 1.0) * 127.5).round().astype(np.uint8)
    cases = []
    for image, caption in zip(images, captions):
        h, w = (rng.uniform(0.25, 0.5, 2) * size).astype(int)
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        hole = np.zeros((size, size), bool)
        hole[top : top + h, left : left + w] = True
        cases.append(HeldOutCase(image, hole, caption))
    return cases


def _mean_mse(outputs: list[np.ndarray], cases: list[HeldOutCase], hole: bool) -> float:
    errors = []
    for out, case in zip(outputs, cases):
        diff = (out.astype(np.float64) - case.image.astype(np.float64)) / 255.0
        region = case.hole if hole else ~case.hole
        errors.append(float((diff[region] ** 2).mean()))
    return float(np.mean(errors))


def _psnr(mse: float) -> float:
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def hole_scores(outputs: list[np.ndarray], cases: list[HeldOutCase]) -> dict[str, float]:
    """Mean MSE (images in [0, 1]) inside the holes and the PSNR (dB) of that mean MSE; for outputs that were
    not blended back, also the same outside the holes (``kept_*``: how well the output reproduces what the
    branch was shown, the first thing it learns)."""
    mse = _mean_mse(outputs, cases, hole=True)
    kept = _mean_mse(outputs, cases, hole=False)
    return {"psnr_db": _psnr(mse), "mse": mse, "kept_psnr_db": _psnr(kept), "kept_mse": kept}


def classical_fills(cases: list[HeldOutCase]) -> dict[str, list[np.ndarray]]:
    """Deterministic fills without any model, the reference a generative fill is read against: the mean
    colour of the kept region, and biharmonic interpolation from the hole's border (``skimage.restoration``)."""
    from skimage.restoration import inpaint_biharmonic

    mean_fill, biharmonic = [], []
    for case in cases:
        filled = case.image.copy()
        filled[case.hole] = case.image[~case.hole].mean(0).round().astype(np.uint8)
        mean_fill.append(filled)
        smooth = inpaint_biharmonic(case.image.astype(np.float64) / 255.0, case.hole, channel_axis=-1)
        biharmonic.append((smooth * 255.0).round().clip(0, 255).astype(np.uint8))
    return {"mean colour": mean_fill, "biharmonic": biharmonic}


def mean_of_samples(samples: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per case, the average of several samples (uint8): an estimate of the posterior mean. A single sample's
    expected squared error is that of the posterior mean plus the posterior variance (twice it for a perfect
    sampler), so the average, not one sample, is what compares with a deterministic fill's PSNR."""
    return [
        np.mean([s[i].astype(np.float64) for s in samples], 0).round().astype(np.uint8)
        for i in range(len(samples[0]))
    ]


def inpaint_cases(
    pipe,
    cases: list[HeldOutCase],
    conditioning_scale: float = 1.0,
    steps: int = 10,
    seed: int = 0,
    **pipe_kwargs: Any,
) -> list[np.ndarray]:
    """Blended outputs (uint8 HxWx3) of a :class:`brushnet.pipeline.BrushNetInpaintPipeline`, one seed per case
    (``pipe_kwargs``: more call options, e.g. ``blend`` / ``blur_size``)."""
    outputs = []
    for i, case in enumerate(cases):
        result = pipe(
            case.caption,
            case.image,
            case.hole,
            num_inference_steps=steps,
            guidance_scale=1.0,
            brushnet_conditioning_scale=conditioning_scale,
            generator=torch.Generator().manual_seed(seed + i),
            output_type="np",
            **pipe_kwargs,
        )
        outputs.append(result.images[0])
    return outputs


def compare_branches(
    base: str | os.PathLike,
    branches: dict[str, str | os.PathLike | BrushNetModel],
    cases: list[HeldOutCase],
    steps: int = 10,
    seed: int = 0,
    outputs: dict[str, list[np.ndarray]] | None = None,
    samples: int = 1,
) -> dict[str, dict[str, float]]:
    """Hole scores of ``base alone`` (the first branch at conditioning scale 0: the same pipeline with no
    branch residuals) and of every branch at scale 1, all with the same seeds. The outputs are scored before
    blending: blending leaves the hole as generated, so the hole scores are those of the blended output, and
    the kept-region scores show how well the output itself follows the input. ``outputs``, when given, gets
    each variant's unblended outputs (uint8 HxWx3, one per case). With ``samples`` > 1 each case is also
    sampled with ``samples - 1`` more seeds and the scores get ``mean_of_samples_psnr_db`` / ``_mse``: those of
    the per-case average (:func:`mean_of_samples`)."""
    from brushnet.loading import load_brushnet
    from brushnet.pipeline import BrushNetInpaintPipeline

    results: dict[str, dict[str, float]] = {}
    pipe = None
    for name, branch in branches.items():
        model = branch if isinstance(branch, BrushNetModel) else load_brushnet(branch)
        if pipe is None:
            pipe = BrushNetInpaintPipeline.from_base(base, model)
            pipe.set_progress_bar_config(disable=True)
            runs = [("base alone", 0.0)]
        else:
            pipe.register_modules(brushnet=model.eval())
            runs = []
        for variant, scale in [*runs, (name, 1.0)]:
            images = inpaint_cases(pipe, cases, scale, steps, seed, blend=False)
            results[variant] = hole_scores(images, cases)
            if samples > 1:
                more = [
                    inpaint_cases(pipe, cases, scale, steps, seed + 1000 * k, blend=False)
                    for k in range(1, samples)
                ]
                averaged = hole_scores(mean_of_samples([images, *more]), cases)
                results[variant]["mean_of_samples_psnr_db"] = averaged["psnr_db"]
                results[variant]["mean_of_samples_mse"] = averaged["mse"]
            if outputs is not None:
                outputs[variant] = images
    return results


def untrained_branch(base: str | os.PathLike) -> BrushNetModel:
    """The branch a new training run starts from: cloned from the base UNet (zero-initialised outputs)."""
    from brushnet.loading import load_base_components

    parts = load_base_components(base)
    return BrushNetModel.from_unet(
        parts.unet, vae_scale_factor=2 ** (len(parts.vae.config.block_out_channels) - 1)
    )
