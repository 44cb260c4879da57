"""The UNet's prediction with a BrushNet branch (:func:`predict_with_branch`, for the trainer and the
pipeline alike), the per-step branch scale and the branch under classifier-free guidance (rules of the
official BrushNet / diffusers' ControlNet pipelines)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from brushnet.injection import unet_forward_with_brushnet
from brushnet.model import BrushNetModel, Residuals


def guidance_keep(step: int, num_steps: int, start: float, end: float) -> float:
    """1.0 where the branch is active at ``step`` of ``num_steps``, else 0.0 (ControlNet pipelines' rule)."""
    return 1.0 - float(step / num_steps < start or (step + 1) / num_steps > end)


def step_scale(scale: float | Sequence[float], keep: float) -> float | list[float]:
    """The conditioning scale (one value or one per residual) of a step, times its ``keep``."""
    if isinstance(scale, (int, float)):
        return float(scale) * keep
    return [float(s) * keep for s in scale]


def all_zero(scale: float | list[float]) -> bool:
    return scale == 0.0 if isinstance(scale, float) else all(s == 0.0 for s in scale)


def branch_residuals(
    brushnet: BrushNetModel,
    model_in: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    cond: torch.Tensor,
    scale: float | list[float],
    added_cond: dict[str, torch.Tensor] | None,
    *,
    cfg: bool,
    guess_mode: bool,
) -> Residuals:
    """The branch's residuals for the (CFG-doubled) batch; guess mode runs it on the text half only and
    gives the unconditional half no residual (official)."""
    if guess_mode and cfg:
        sample, embeds = model_in.chunk(2)[1], embeds.chunk(2)[1]
        if added_cond is not None:
            added_cond = {k: v.chunk(2)[1] for k, v in added_cond.items()}
    else:
        sample = model_in
        cond = torch.cat([cond] * 2) if cfg and len(cond) != len(sample) else cond  # unless one per half
    dtype = brushnet.dtype
    if added_cond is not None:
        added_cond = {k: v.to(dtype) for k, v in added_cond.items()}
    down, mid, up = brushnet(
        sample.to(dtype),
        t,
        encoder_hidden_states=embeds.to(dtype),
        brushnet_cond=cond,
        conditioning_scale=scale,
        added_cond_kwargs=added_cond,
        guess_mode=guess_mode,
        return_dict=False,
    )
    if guess_mode and cfg:
        down = [torch.cat([torch.zeros_like(d), d]) for d in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
        up = [torch.cat([torch.zeros_like(u), u]) for u in up]
    return down, mid, up


def predict_with_branch(
    unet,
    brushnet: BrushNetModel,
    sample: torch.Tensor,
    t: torch.Tensor,
    embeds: torch.Tensor,
    cond: torch.Tensor,
    added_cond: dict[str, torch.Tensor] | None = None,
    *,
    scale: float | list[float] = 1.0,
    cfg: bool = False,
    guess_mode: bool = False,
) -> torch.Tensor:
    """The frozen ``unet``'s prediction for ``sample`` with the residuals of ``brushnet`` (which reads
    ``cond`` = :func:`brushnet.injection.branch_condition`) added as its ``injection`` config says."""
    down, mid, up = branch_residuals(
        brushnet, sample, t, embeds, cond, scale, added_cond, cfg=cfg, guess_mode=guess_mode
    )
    return unet_forward_with_brushnet(
        unet,
        sample.to(unet.dtype),
        t,
        embeds,
        down_block_add_samples=down,
        mid_block_add_sample=mid,
        up_block_add_samples=up,
        added_cond_kwargs=added_cond,
        injection=brushnet.config.get("injection", "full"),
    )
