"""Add BrushNet residuals to every layer of a **stock** diffusers ``UNet2DConditionModel``.

No fork of diffusers and no global monkeypatch: for the duration of one UNet call we register PyTorch
hooks on the UNet's own submodules, each holding the residual for its layer, and remove them afterwards.
A hook is keyed by module, not by call order, so when gradient checkpointing recomputes a resnet in the
backward pass the same residual is added again, and the caller's lists are never consumed or mutated.

Positions (official TencentARC/BrushNet ``unet_2d_condition.py`` / ``unet_2d_blocks.py``):

* ``down[0]``: after ``conv_in``. The first skip connection keeps the value *before* the add, so it is
  added to the input of the first down block rather than to ``conv_in``'s output.
* then, per down block: after every resnet (+ its attention, when the block has one) and after the
  downsampler, before the value is stored as a skip;
* ``mid``: after the mid block;
* ``up``: per up block, after every resnet (+ attention) and after the upsampler.

Ablations (``BrushNetModel.config.injection``): ``half`` adds the down and mid residuals as above and no
up residuals; ``controlnet`` hands them to the UNet's own ControlNet inputs
(``down_block_additional_residuals``: added to the skip connections the decoder reads, not to the encoder's
forward path; ``mid_block_additional_residual``: added to the mid block's output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _layer_outputs(block: nn.Module) -> list[nn.Module]:
    """The modules whose outputs receive a residual in one down/up block, in order."""
    attentions = getattr(block, "attentions", None)
    layers = list(attentions) if attentions is not None and len(attentions) else list(block.resnets)
    for sampler in ("downsamplers", "upsamplers"):
        if getattr(block, sampler, None) is not None:
            layers.append(getattr(block, sampler)[0])
    return layers


def residual_targets(unet: nn.Module) -> tuple[list[nn.Module], nn.Module, list[nn.Module]]:
    """Modules of ``unet`` receiving (down, mid, up) residuals; ``down[0]`` is ``down_blocks[0]`` (input)."""
    down = [unet.down_blocks[0]]
    for block in unet.down_blocks:
        down += _layer_outputs(block)
    up = [m for block in unet.up_blocks for m in _layer_outputs(block)]
    return down, unet.mid_block, up


def _add(output: Any, residual: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return output + residual.to(output.dtype)
    if isinstance(output, tuple):  # Transformer2DModel(..., return_dict=False) -> (sample,)
        return (output[0] + residual.to(output[0].dtype), *output[1:])
    if hasattr(output, "sample"):  # Transformer2DModelOutput
        output.sample = output.sample + residual.to(output.sample.dtype)
        return output
    raise TypeError(f"cannot add a BrushNet residual to a module output of type {type(output).__name__}")


def _output_hook(residual: torch.Tensor):
    def hook(module, args, output):
        return _add(output, residual)

    return hook


def _input_hook(residual: torch.Tensor):
    def hook(module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": _add(kwargs["hidden_states"], residual)}
        else:
            args = (_add(args[0], residual), *args[1:])
        return args, kwargs

    return hook


@contextmanager
def brushnet_residuals(
    unet: nn.Module,
    down_block_add_samples: Sequence[torch.Tensor],
    mid_block_add_sample: torch.Tensor,
    up_block_add_samples: Sequence[torch.Tensor],
    injection: str = "full",
) -> Iterator[nn.Module]:
    """Within the ``with`` block, every call of ``unet`` adds the given residuals at their layers
    (``injection="half"``: no up residuals)."""
    down_t, mid_t, up_t = residual_targets(unet)
    up_t = up_t if injection == "full" else []
    if len(down_block_add_samples) != len(down_t) or len(up_block_add_samples) != len(up_t):
        raise ValueError(
            f"this UNet takes {len(down_t)} down and {len(up_t)} up residuals, got "
            f"{len(down_block_add_samples)} and {len(up_block_add_samples)}: is the BrushNet branch "
            "built from a UNet of the same architecture?"
        )
    handles = [down_t[0].register_forward_pre_hook(_input_hook(down_block_add_samples[0]), with_kwargs=True)]
    handles += [
        m.register_forward_hook(_output_hook(r)) for m, r in zip(down_t[1:], down_block_add_samples[1:])
    ]
    handles.append(mid_t.register_forward_hook(_output_hook(mid_block_add_sample)))
    handles += [m.register_forward_hook(_output_hook(r)) for m, r in zip(up_t, up_block_add_samples)]
    try:
        yield unet
    finally:
        for h in handles:
            h.remove()


def unet_forward_with_brushnet(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    down_block_add_samples: Sequence[torch.Tensor],
    mid_block_add_sample: torch.Tensor,
    up_block_add_samples: Sequence[torch.Tensor],
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    injection: str = "full",
    **unet_kwargs: Any,
) -> torch.Tensor:
    """The stock UNet's prediction with BrushNet residuals added at every layer (``injection``: the
    branch's ``config.injection``, see the module docstring)."""
    if injection == "controlnet":
        if len(up_block_add_samples):
            raise ValueError("a controlnet-injection branch has no up residuals")
        return unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=list(down_block_add_samples),
            mid_block_additional_residual=mid_block_add_sample,
            return_dict=False,
            **unet_kwargs,
        )[0]
    with brushnet_residuals(
        unet, down_block_add_samples, mid_block_add_sample, up_block_add_samples, injection
    ):
        return unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
            **unet_kwargs,
        )[0]


def branch_condition(
    branch: nn.Module, masked_latents: torch.Tensor, masked_pixels: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The branch's ``brushnet_cond`` for its ``condition_encoder``.

    ``masked_latents``: VAE latents of the masked image (times ``scaling_factor``); ``masked_pixels``: the
    masked image in [-1, 1]; ``keep``: the mask at pixel size, 1 = keep. ``vae`` (BrushNet): the latents and
    the mask resized to latent size (nearest, as the official training script); ``conv`` (ablation): the
    pixel-space masked image and mask.
    """
    keep = keep.to(masked_latents.dtype)
    if getattr(branch.config, "condition_encoder", "vae") == "conv":
        return torch.cat([masked_pixels.to(masked_latents.dtype), keep], dim=1)
    return torch.cat([masked_latents, F.interpolate(keep, size=masked_latents.shape[-2:])], dim=1)
