"""Pieces shared by the DiT branches: image-only blocks, weight copying, the branch -> base block map.

The image-only blocks are the image stream of the base's joint (MMDiT) block with the text stream cut away:
same module names, so their state dict is a subset of the base block's and is copied key by key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.normalization import AdaLayerNormZero, SD35AdaLayerNormZeroX
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch import nn

Scale = float | Sequence[float]


def zero_linear(dim: int) -> nn.Linear:
    """A ``dim -> dim`` linear with zero weight and bias: the branch's output projection."""
    linear = nn.Linear(dim, dim)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


@torch.no_grad()
def copy_from(ours: nn.Module, theirs: nn.Module, where: str) -> None:
    """Copy every tensor of ``ours`` from the same key of ``theirs``; a missing key or shape is an error."""
    source = theirs.state_dict()
    for key, tensor in ours.state_dict().items():
        if key not in source or source[key].shape != tensor.shape:
            found = tuple(source[key].shape) if key in source else "missing"
            raise ValueError(f"cannot copy {where}.{key} {tuple(tensor.shape)} from the base (found {found})")
        tensor.copy_(source[key])


@torch.no_grad()
def copy_input_embedding(ours: torch.Tensor, base: torch.Tensor, latent_channels: int) -> None:
    """Input weight ``[noisy | masked | mask]`` (dim 1): both latent parts are the base's, the mask part 0."""
    w = torch.zeros_like(ours)
    w[:, :latent_channels] = base
    w[:, latent_channels : 2 * latent_channels] = base
    ours.copy_(w)


def branch_index(base_block: int, num_base: int, num_branch: int) -> int:
    """The branch block whose output feeds base block ``base_block`` of ``num_base``.

    ``floor(i * N / M)``: the even spread of diffusers' SD3 ControlNet (``int(i / (M / N))``) in integer
    arithmetic. Every branch block feeds at least one base block (diffusers' Flux rule, ``i // ceil(M / N)``,
    can leave the last branch blocks unused, e.g. M = 10, N = 6).
    """
    return base_block * num_branch // num_base


def spread(features: Sequence[torch.Tensor], num_base: int, scale: Scale) -> list[torch.Tensor]:
    """One residual per base block from the branch's ``N`` outputs, times ``scale`` (float or one per block)."""
    n = len(features)
    if isinstance(scale, (int, float)):
        scaled = [f * scale for f in features]
        return [scaled[branch_index(i, num_base, n)] for i in range(num_base)]
    scales = list(scale)
    if len(scales) != num_base:
        raise ValueError(
            f"a per-block conditioning_scale needs one value per base block ({num_base}), got {len(scales)}"
        )
    return [features[branch_index(i, num_base, n)] * s for i, s in enumerate(scales)]


class SD3ImageBlock(nn.Module):
    """The image stream of ``JointTransformerBlock`` (SD3 / SD3.5): self-attention over image tokens only.

    Like diffusers' ``SD3SingleTransformerBlock`` (what its SD3 ControlNet uses without a text stream), but
    with the base block's ``qk_norm`` and SD3.5's second image attention (``attn2``) kept, so every weight
    of the image stream is copied and the block computes what the base block computes without text.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, qk_norm, dual: bool):
        super().__init__()
        self.use_dual_attention = dual
        self.norm1 = SD35AdaLayerNormZeroX(dim) if dual else AdaLayerNormZero(dim)
        kw = dict(
            query_dim=dim,
            dim_head=attention_head_dim,
            heads=num_attention_heads,
            out_dim=dim,
            bias=True,
            qk_norm=qk_norm,
            eps=1e-6,  # JointTransformerBlock's value
        )
        self.attn = Attention(processor=JointAttnProcessor2_0(), **kw)
        self.attn2 = Attention(processor=JointAttnProcessor2_0(), **kw) if dual else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.use_dual_attention:
            norm, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm2, gate_msa2 = self.norm1(
                hidden_states, emb=temb
            )
        else:
            norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * self.attn(hidden_states=norm)
        if self.use_dual_attention:
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * self.attn2(hidden_states=norm2)
        norm = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm)


class FluxImageBlock(nn.Module):
    """The image stream of ``FluxTransformerBlock`` (double-stream): rotary self-attention over image tokens."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.attn = FluxAttention(
            query_dim=dim,
            dim_head=attention_head_dim,
            heads=num_attention_heads,
            out_dim=dim,
            bias=True,
            processor=FluxAttnProcessor(),
            eps=1e-6,  # FluxTransformerBlock's value
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        # Without a text stream FluxAttnProcessor returns the attention before ``to_out`` (its single-block
        # form); the double-stream block projects it, so we do too.
        attn = self.attn(hidden_states=norm, image_rotary_emb=image_rotary_emb)
        attn = self.attn.to_out[1](self.attn.to_out[0](attn))
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn
        norm = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm)
