"""Add DiT-branch residuals to a **stock** ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``.

Every base block gets one residual on its image tokens, right after the block.

* **Flux**: the stock ``controlnet_block_samples`` / ``controlnet_single_block_samples`` inputs add a
  residual after every double- and single-stream block (image tokens). We pass exactly one residual per
  block, so diffusers' spreading rule (``i // ceil(M / N)``) is the identity and our own map applies.
* **SD3**: the stock ``block_controlnet_hidden_states`` skips the last joint block (it adds only where
  ``block.context_pre_only is False``), so it cannot give "every block". We add the residuals with
  forward hooks on the base's own blocks, keyed by module like :mod:`brushnet.injection`: a
  gradient-checkpoint recompute adds the same residual again, nothing is consumed, and the hooks are
  removed when the call ends. (A block listed in ``skip_layers`` does not run and gets no residual.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _image_stream_hook(residual: torch.Tensor):
    def hook(module, args, output):
        context, hidden = output
        return context, hidden + residual.to(hidden.dtype)

    return hook


@contextmanager
def sd3_brushnet_residuals(
    transformer: nn.Module, block_residuals: Sequence[torch.Tensor]
) -> Iterator[nn.Module]:
    """Within the ``with`` block, every call of ``transformer`` adds ``block_residuals[i]`` after block ``i``."""
    blocks = transformer.transformer_blocks
    if len(block_residuals) != len(blocks):
        raise ValueError(
            f"this SD3 transformer has {len(blocks)} blocks but got {len(block_residuals)} residuals: is the "
            "branch built from a base of the same depth?"
        )
    handles = [b.register_forward_hook(_image_stream_hook(r)) for b, r in zip(blocks, block_residuals)]
    try:
        yield transformer
    finally:
        for h in handles:
            h.remove()


def sd3_forward_with_brushnet(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    block_residuals: Sequence[torch.Tensor],
    **transformer_kwargs: Any,
) -> torch.Tensor:
    """The stock SD3 transformer's prediction with a residual added after every joint block."""
    with sd3_brushnet_residuals(transformer, block_residuals):
        return transformer(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
            **transformer_kwargs,
        )[0]


def flux_forward_with_brushnet(
    transformer: nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    block_residuals: Sequence[torch.Tensor],
    single_block_residuals: Sequence[torch.Tensor],
    guidance: torch.Tensor | None = None,
    **transformer_kwargs: Any,
) -> torch.Tensor:
    """The stock Flux transformer's prediction with a residual after every double- and single-stream block."""
    n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    if len(block_residuals) != n_double or len(single_block_residuals) != n_single:
        raise ValueError(
            f"this Flux transformer has {n_double} double- and {n_single} single-stream blocks but got "
            f"{len(block_residuals)} and {len(single_block_residuals)} residuals: is the branch built from a "
            "base of the same depth?"
        )
    dtype = transformer.dtype  # residuals join the base's stream in its dtype (no silent fp32 promotion)
    return transformer(
        hidden_states=hidden_states,
        timestep=timestep,
        guidance=guidance,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=pooled_projections,
        img_ids=img_ids,
        txt_ids=txt_ids,
        controlnet_block_samples=[r.to(dtype) for r in block_residuals],
        controlnet_single_block_samples=[r.to(dtype) for r in single_block_residuals],
        return_dict=False,
        **transformer_kwargs,
    )[0]
