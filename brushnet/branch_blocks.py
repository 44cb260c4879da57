"""Blocks of the BrushNet branch and the per-layer walks through them.

The default branch is attention-free (``DownBlock2D``, the official two-resnet ``MidBlock2D``,
``UpBlock2D``); the ``branch_cross_attention`` ablation keeps the base UNet's attention blocks
(``CrossAttnDownBlock2D`` ...), which the official ``BrushNetModel`` also builds from its config. Each walk
returns every layer output that receives a residual, in the order of :mod:`brushnet.injection`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from torch import nn

Run = Callable[..., torch.Tensor]  # runs a resnet, possibly under gradient checkpointing


class MidBlock2D(nn.Module):
    """Two resnets and no attention: the official branch's ``MidBlock2D`` (keys ``resnets.{0,1}``)."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        output_scale_factor: float,
        resnet_time_scale_shift: str,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                in_channels=in_channels,
                out_channels=in_channels,
                temb_channels=temb_channels,
                eps=resnet_eps,
                groups=resnet_groups,
                time_embedding_norm=resnet_time_scale_shift,
                non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor,
            )
            for _ in range(2)
        )


def _per_block(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def build_blocks(cfg, time_embed_dim: int, with_up: bool) -> tuple[nn.ModuleList, nn.Module, nn.ModuleList]:
    """Down, mid and up blocks for a branch config, with the arguments ``UNet2DConditionModel`` passes
    (so an attention branch's keys and shapes equal the UNet's blocks)."""
    channels = list(cfg.block_out_channels)
    n = len(channels)
    groups = cfg.norm_num_groups if cfg.norm_num_groups is not None else 32
    # diffusers' UNet reads SD 1.5's `attention_head_dim` as the number of heads when num_attention_heads is unset
    heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
    head_dims = _per_block(cfg.attention_head_dim, n)
    layers = _per_block(cfg.transformer_layers_per_block, n)
    only_cross = _per_block(cfg.only_cross_attention, n)
    common = {
        "temb_channels": time_embed_dim,
        "resnet_eps": cfg.norm_eps,
        "resnet_act_fn": cfg.act_fn,
        "resnet_groups": groups,
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "resnet_time_scale_shift": cfg.resnet_time_scale_shift,
    }
    down = nn.ModuleList()
    out_ch = channels[0]
    for i, block_type in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, channels[i]
        down.append(
            get_down_block(
                block_type,
                num_layers=cfg.layers_per_block,
                in_channels=in_ch,
                out_channels=out_ch,
                add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding,
                transformer_layers_per_block=layers[i],
                num_attention_heads=heads[i],
                only_cross_attention=only_cross[i],
                attention_head_dim=head_dims[i] if head_dims[i] is not None else out_ch,
                **common,
            )
        )
    mid_kw = {k: common[k] for k in ("temb_channels", "resnet_eps", "resnet_act_fn", "resnet_groups")}
    if cfg.mid_block_type == "MidBlock2D":
        mid: nn.Module = MidBlock2D(
            in_channels=channels[-1],
            output_scale_factor=cfg.mid_block_scale_factor,
            resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            **mid_kw,
        )
    else:
        mid = get_mid_block(
            cfg.mid_block_type,
            in_channels=channels[-1],
            output_scale_factor=cfg.mid_block_scale_factor,
            transformer_layers_per_block=layers[-1],
            num_attention_heads=heads[-1],
            cross_attention_dim=cfg.cross_attention_dim,
            use_linear_projection=cfg.use_linear_projection,
            upcast_attention=cfg.upcast_attention,
            resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            **mid_kw,
        )
    up = nn.ModuleList()
    if not with_up:
        return down, mid, up
    rev, rev_heads, rev_layers = channels[::-1], heads[::-1], layers[::-1]
    rev_only_cross, rev_head_dims = only_cross[::-1], head_dims[::-1]
    out_ch = rev[0]
    for i, block_type in enumerate(cfg.up_block_types):
        prev_ch, out_ch = out_ch, rev[i]
        up.append(
            get_up_block(
                block_type,
                num_layers=cfg.layers_per_block + 1,
                in_channels=rev[min(i + 1, n - 1)],
                out_channels=out_ch,
                prev_output_channel=prev_ch,
                add_upsample=i < n - 1,
                resolution_idx=i,
                transformer_layers_per_block=rev_layers[i],
                num_attention_heads=rev_heads[i],
                only_cross_attention=rev_only_cross[i],
                attention_head_dim=rev_head_dims[i] if rev_head_dims[i] is not None else out_ch,
                **common,
            )
        )
    return down, mid, up


def _attentions(block: nn.Module, n: int) -> list:
    attentions = getattr(block, "attentions", None)
    return list(attentions) if attentions is not None and len(attentions) else [None] * n


def _attend(attn: nn.Module | None, h: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    return h if attn is None else attn(h, encoder_hidden_states=text, return_dict=False)[0]


def walk_down(block, h, emb, text, run: Run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every resnet (+ attention) output and the downsampler output of one down block."""
    outs = []
    for resnet, attn in zip(block.resnets, _attentions(block, len(block.resnets))):
        h = _attend(attn, run(resnet, h, emb), text)
        outs.append(h)
    if block.downsamplers is not None:
        h = block.downsamplers[0](h)
        outs.append(h)
    return h, outs


def walk_mid(block, h, emb, text, run: Run) -> torch.Tensor:
    """The mid block: resnet, then (attention, resnet) pairs."""
    h = run(block.resnets[0], h, emb)
    for attn, resnet in zip(_attentions(block, len(block.resnets) - 1), block.resnets[1:]):
        h = run(resnet, _attend(attn, h, text), emb)
    return h


def walk_up(block, h, skips: list[torch.Tensor], emb, text, run: Run) -> tuple[torch.Tensor, list]:
    """Every resnet (+ attention) output and the upsampler output of one up block; pops its skips."""
    outs = []
    for resnet, attn in zip(block.resnets, _attentions(block, len(block.resnets))):
        h = _attend(attn, run(resnet, torch.cat([h, skips.pop()], dim=1), emb), text)
        outs.append(h)
    if block.upsamplers is not None:
        h = block.upsamplers[0](h, skips[-1].shape[2:])
        outs.append(h)
    return h, outs
