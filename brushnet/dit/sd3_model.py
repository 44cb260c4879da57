"""`BrushNetSD3Model`: a BrushNet branch for a stock ``SD3Transformer2DModel`` (SD3 / SD3.5 medium and large).

The BrushNet principles carried over to an MMDiT base:

1. **VAE-latent condition.** The branch input is ``[noisy latent, masked-image latent, mask]``
   (16 + 16 + 1 channels, mask 1 = keep) through a patch embedding copied from the base: both latent
   parts start from the base's ``pos_embed.proj`` weights, the mask part from zero.
2. **Image-only branch** (the DiT analogue of "no cross-attention"). The branch blocks are the image
   stream of the base's first ``num_layers`` joint blocks (:class:`~brushnet.dit.blocks.SD3ImageBlock`,
   qk-norm and SD3.5's ``attn2`` kept); the timestep and pooled text still modulate them through a copy
   of the base's ``time_text_embed``. ``branch_text=True`` copies the full joint blocks and the
   ``context_embedder`` instead (the ablation with the text stream).
3. **Dense injection.** Each branch block's output passes through a zero-initialised linear; the N outputs
   are spread over all M base blocks (:func:`~brushnet.dit.blocks.branch_index`), one residual per base
   block, added to that block's image tokens (:mod:`brushnet.dit.injection`).
4. A zero-initialised branch leaves the base prediction bit-identical; ``conditioning_scale`` is a float
   or one value per base block.

Default depth: a quarter of the base's blocks, rounded up (medium 6 of 24, large 10 of 38); see
:func:`default_num_layers` and the README ("DiT bases").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from brushnet.dit.blocks import Scale, SD3ImageBlock, copy_from, copy_input_embedding, spread, zero_linear

# Config fields that must equal the base transformer's for the branch to fit it (checked on pairing).
SD3_MATCH_FIELDS = (
    "patch_size",
    "in_channels",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "qk_norm",
)


def default_num_layers(num_base_layers: int) -> int:
    """A quarter of the base's blocks, rounded up: each branch block feeds about four base blocks."""
    return math.ceil(num_base_layers / 4)


@dataclass
class BrushNetSD3Output(BaseOutput):
    """``block_residuals``: one ``B x tokens x dim`` tensor per base joint block, already scaled."""

    block_residuals: tuple[torch.Tensor, ...]


class BrushNetSD3Model(ModelMixin, ConfigMixin):
    """The BrushNet branch for SD3 / SD3.5. Build it with :meth:`from_transformer`, load with ``from_pretrained``.

    Config fields named like ``SD3Transformer2DModel``'s describe the base; ``num_layers`` is the branch's
    depth and ``base_num_layers`` the base's (the number of residuals).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 6,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int | None = 384,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        base_num_layers: int = 24,
        branch_text: bool = False,
        mask_channels: int = 1,
    ):
        super().__init__()
        if not 1 <= num_layers <= base_num_layers:
            raise ValueError(
                f"num_layers must be in [1, base_num_layers={base_num_layers}], got {num_layers}"
            )
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=2 * in_channels + mask_channels,
            embed_dim=dim,
            pos_embed_max_size=pos_embed_max_size,
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=dim, pooled_projection_dim=pooled_projection_dim
        )
        dual = set(dual_attention_layers)
        if branch_text:
            self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
            blocks = [
                JointTransformerBlock(
                    dim=dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    context_pre_only=i == base_num_layers - 1,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual,
                )
                for i in range(num_layers)
            ]
        else:
            blocks = [
                SD3ImageBlock(dim, num_attention_heads, attention_head_dim, qk_norm, dual=i in dual)
                for i in range(num_layers)
            ]
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
    ) -> BrushNetSD3Model:
        """A branch cloned from a stock ``SD3Transformer2DModel``: branch block ``k`` starts as base block ``k``.

        ``num_layers`` defaults to :func:`default_num_layers`. The base's ``out_channels`` must equal its
        ``in_channels`` (a plain latent input, not an inpainting base with extra input channels).
        """
        cfg = transformer.config
        if cfg.out_channels not in (None, cfg.in_channels):
            raise ValueError(
                f"BrushNetSD3Model needs a base whose input is the latent alone (in_channels == out_channels), "
                f"got in_channels={cfg.in_channels} out_channels={cfg.out_channels}"
            )
        branch = cls(
            sample_size=cfg.sample_size,
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            num_layers=num_layers or default_num_layers(cfg.num_layers),
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            joint_attention_dim=cfg.joint_attention_dim,
            caption_projection_dim=cfg.caption_projection_dim,
            pooled_projection_dim=cfg.pooled_projection_dim,
            pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=tuple(cfg.get("dual_attention_layers", ()) or ()),
            qk_norm=cfg.get("qk_norm"),
            base_num_layers=cfg.num_layers,
            branch_text=branch_text,
            mask_channels=1,
        )
        if load_weights_from_transformer:
            branch._copy_weights_from(transformer)
        return branch if transformer.dtype == branch.dtype else branch.to(dtype=transformer.dtype)

    @torch.no_grad()
    def _copy_weights_from(self, transformer) -> None:
        base_proj = transformer.pos_embed.proj
        copy_input_embedding(self.pos_embed.proj.weight, base_proj.weight, self.config.in_channels)
        self.pos_embed.proj.bias.copy_(base_proj.bias)
        if self.pos_embed.pos_embed is not None:
            self.pos_embed.pos_embed.copy_(transformer.pos_embed.pos_embed)
        copy_from(self.time_text_embed, transformer.time_text_embed, "time_text_embed")
        if self.config.branch_text:
            copy_from(self.context_embedder, transformer.context_embedder, "context_embedder")
        for k, block in enumerate(self.transformer_blocks):
            copy_from(block, transformer.transformer_blocks[k], f"transformer_blocks.{k}")

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        brushnet_cond: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        conditioning_scale: Scale = 1.0,
        return_dict: bool = True,
    ) -> BrushNetSD3Output | tuple:
        """Residuals for every base block.

        ``hidden_states``: the noisy latent ``B x 16 x h x w`` (what the base gets); ``brushnet_cond``:
        ``cat([masked-image latent, mask], 1)``, mask 1 = keep; ``timestep`` and ``pooled_projections`` as
        for the base. ``encoder_hidden_states`` (the prompt embeddings) is used only with ``branch_text``.
        """
        cond_channels = self.config.in_channels + self.config.mask_channels
        if brushnet_cond.shape[1] != cond_channels or brushnet_cond.shape[2:] != hidden_states.shape[2:]:
            raise ValueError(
                f"brushnet_cond must be [masked-image latent ({self.config.in_channels} ch), mask "
                f"({self.config.mask_channels} ch)] at the latent's size {tuple(hidden_states.shape[2:])}, "
                f"got shape {tuple(brushnet_cond.shape)}"
            )
        h = self.pos_embed(torch.cat([hidden_states, brushnet_cond.to(hidden_states.dtype)], dim=1))
        h = h.contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        features = []
        if self.config.branch_text:
            if encoder_hidden_states is None:
                raise ValueError("this branch has branch_text=True: pass encoder_hidden_states")
            context = self.context_embedder(encoder_hidden_states)
            for block, out in zip(self.transformer_blocks, self.brushnet_blocks):
                context, h = self._run(block, h, context, temb)
                features.append(out(h))
        else:
            for block, out in zip(self.transformer_blocks, self.brushnet_blocks):
                h = self._run(block, h, temb)
                features.append(out(h))
        residuals = tuple(spread(features, self.config.base_num_layers, conditioning_scale))
        if not return_dict:
            return (residuals,)
        return BrushNetSD3Output(block_residuals=residuals)
