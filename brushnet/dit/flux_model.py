"""`BrushNetFluxModel`: a BrushNet branch for a stock ``FluxTransformer2DModel`` (Flux.1 dev / schnell).

The BrushNet principles on Flux (see :mod:`brushnet.dit.sd3_model` for the SD3 form):

1. **VAE-latent condition** in Flux's packed 2x2 form: ``[noisy, masked-image latent, mask]`` is
   64 + 64 + 4 channels per token (mask 1 = keep, packed like the latents), through an ``x_embedder``
   whose two latent parts are copies of the base's and whose mask part is zero.
2. **Image-only branch.** Branch block ``k`` is the image stream of base double-stream block ``k``
   (:class:`~brushnet.dit.blocks.FluxImageBlock`): rotary self-attention over the image tokens only. The
   timestep, pooled CLIP text and (dev) the guidance embedding still modulate it, through a copy of the
   base's ``time_text_embed``. ``branch_text=True`` copies the full double-stream blocks and the
   ``context_embedder`` instead.
3. **Dense injection** into both kinds of base block: the N zero-initialised outputs are spread over the
   19 double-stream and then the 38 single-stream blocks as one sequence of M = 57, one residual per base
   block on its image tokens (the stock ``controlnet_block_samples`` / ``controlnet_single_block_samples``).
4. Zero branch => bit-identical base prediction; ``conditioning_scale`` float or one value per base block.

Default depth: a quarter of the base's double-stream blocks, rounded up (5 for Flux.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxTransformerBlock
from diffusers.utils import BaseOutput
from torch import nn

from brushnet.dit.blocks import FluxImageBlock, Scale, copy_from, copy_input_embedding, spread, zero_linear
from brushnet.dit.sd3_model import default_num_layers

FLUX_MATCH_FIELDS = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
    "axes_dims_rope",
)

# FluxTransformer2DModel builds its rotary embedding with theta=10000 (not a config field).
_ROPE_THETA = 10000


@dataclass
class BrushNetFluxOutput(BaseOutput):
    """One ``B x image tokens x dim`` residual per base double-stream block, then per single-stream block."""

    block_residuals: tuple[torch.Tensor, ...]
    single_block_residuals: tuple[torch.Tensor, ...]


class BrushNetFluxModel(ModelMixin, ConfigMixin):
    """The BrushNet branch for Flux.1. Build it with :meth:`from_transformer`, load with ``from_pretrained``.

    Fields named like ``FluxTransformer2DModel``'s describe the base; ``num_layers`` is the branch depth,
    ``base_num_layers`` / ``base_num_single_layers`` the base's double / single block counts.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 5,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        base_num_layers: int = 19,
        base_num_single_layers: int = 38,
        branch_text: bool = False,
        mask_channels: int = 4,
    ):
        super().__init__()
        if not 1 <= num_layers <= base_num_layers:
            raise ValueError(
                f"num_layers must be in [1, base_num_layers={base_num_layers}], got {num_layers}"
            )
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.pos_embed = FluxPosEmbed(theta=_ROPE_THETA, axes_dim=list(axes_dims_rope))
        embed_cls = (
            CombinedTimestepGuidanceTextProjEmbeddings
            if guidance_embeds
            else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = embed_cls(embedding_dim=dim, pooled_projection_dim=pooled_projection_dim)
        if branch_text:
            self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.x_embedder = nn.Linear(2 * in_channels + mask_channels, dim)
        if branch_text:
            blocks = [
                FluxTransformerBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
            ]
        else:
            blocks = [FluxImageBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.brushnet_blocks = nn.ModuleList(zero_linear(dim) for _ in range(num_layers))
        self.gradient_checkpointing = False

    @classmethod
    def from_transformer(
        cls,
        transformer,
        num_layers: int | None = None,
        branch_text: bool = False,
        load_weights_from_transformer: bool = True,
    ) -> BrushNetFluxModel:
        """A branch cloned from a stock ``FluxTransformer2DModel``: branch block ``k`` starts as double block ``k``.

        ``num_layers`` defaults to a quarter of the base's double-stream blocks. Bases whose input is more
        than the packed latent (Flux Fill: 384 input channels) are refused.
        """
        cfg = transformer.config
        if (cfg.out_channels or cfg.in_channels) != cfg.in_channels:
            raise ValueError(
                "BrushNetFluxModel needs a base whose input is the packed latent alone (in_channels == "
                f"out_channels), got in_channels={cfg.in_channels} out_channels={cfg.out_channels}"
            )
        branch = cls(
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            num_layers=num_layers or default_num_layers(cfg.num_layers),
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.joint_attention_dim,
            pooled_projection_dim=cfg.pooled_projection_dim,
            guidance_embeds=cfg.guidance_embeds,
            axes_dims_rope=tuple(cfg.axes_dims_rope),
            base_num_layers=cfg.num_layers,
            base_num_single_layers=cfg.num_single_layers,
            branch_text=branch_text,
            mask_channels=cfg.in_channels // 16,  # 1 mask channel per 16 latent channels, packed 2x2
        )
        if load_weights_from_transformer:
            branch._copy_weights_from(transformer)
        return branch if transformer.dtype == branch.dtype else branch.to(dtype=transformer.dtype)

    @torch.no_grad()
    def _copy_weights_from(self, transformer) -> None:
        copy_input_embedding(self.x_embedder.weight, transformer.x_embedder.weight, self.config.in_channels)
        self.x_embedder.bias.copy_(transformer.x_embedder.bias)
        copy_from(self.time_text_embed, transformer.time_text_embed, "time_text_embed")
        if self.config.branch_text:
            copy_from(self.context_embedder, transformer.context_embedder, "context_embedder")
        for k, block in enumerate(self.transformer_blocks):
            copy_from(block, transformer.transformer_blocks[k], f"transformer_blocks.{k}")

    @property
    def num_base_blocks(self) -> int:
        return self.config.base_num_layers + self.config.base_num_single_layers

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        brushnet_cond: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        conditioning_scale: Scale = 1.0,
        return_dict: bool = True,
    ) -> BrushNetFluxOutput | tuple:
        """Residuals for every base block.

        ``hidden_states``: packed noisy latents ``B x tokens x 64``; ``brushnet_cond``: packed
        ``[masked-image latent, mask]`` ``B x tokens x 68``; ``timestep`` in [0, 1] and ``guidance`` as the
        base takes them (both are multiplied by 1000 here, as in the base); ``img_ids`` ``tokens x 3``.
        ``encoder_hidden_states`` / ``txt_ids`` are used only with ``branch_text``.
        """
        cond_channels = self.config.in_channels + self.config.mask_channels
        if brushnet_cond.shape[-1] != cond_channels or brushnet_cond.shape[:2] != hidden_states.shape[:2]:
            raise ValueError(
                f"brushnet_cond must be packed [masked-image latent ({self.config.in_channels}), mask "
                f"({self.config.mask_channels})] per token, B x {hidden_states.shape[1]} x {cond_channels}, "
                f"got shape {tuple(brushnet_cond.shape)}"
            )
        h = self.x_embedder(torch.cat([hidden_states, brushnet_cond.to(hidden_states.dtype)], dim=-1))
        timestep = timestep.to(h.dtype) * 1000
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this branch is for a guidance-distilled base (Flux dev): pass guidance")
            temb = self.time_text_embed(timestep, guidance.to(h.dtype) * 1000, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        features = []
        if self.config.branch_text:
            if encoder_hidden_states is None or txt_ids is None:
                raise ValueError("this branch has branch_text=True: pass encoder_hidden_states and txt_ids")
            context = self.context_embedder(encoder_hidden_states)
            rotary = self.pos_embed(torch.cat([txt_ids, img_ids], dim=0))
            for block, out in zip(self.transformer_blocks, self.brushnet_blocks):
                context, h = self._run(block, h, context, temb, rotary)
                features.append(out(h))
        else:
            rotary = self.pos_embed(img_ids)
            for block, out in zip(self.transformer_blocks, self.brushnet_blocks):
                h = self._run(block, h, temb, rotary)
                features.append(out(h))
        residuals = spread(features, self.num_base_blocks, conditioning_scale)
        double = tuple(residuals[: self.config.base_num_layers])
        single = tuple(residuals[self.config.base_num_layers :])
        if not return_dict:
            return double, single
        return BrushNetFluxOutput(block_residuals=double, single_block_residuals=single)
