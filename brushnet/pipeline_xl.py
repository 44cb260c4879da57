"""SDXL-only conditioning for :class:`brushnet.pipeline.BrushNetInpaintPipeline`.

An SDXL base has two CLIP text encoders: the UNet's ``encoder_hidden_states`` are both encoders'
*penultimate* hidden states concatenated on the feature axis, and its ``added_cond_kwargs`` carry the
second encoder's pooled (projected) embedding plus six "time ids" (original size, crop top-left, target
size). Same recipe as diffusers' ``StableDiffusionXLPipeline`` and the official
``pipeline_brushnet_sd_xl.py``; the BrushNet branch receives the same ``added_cond_kwargs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's context length (77 for CLIP)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_prompt_sdxl(
    tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds B x 77 x (d1 + d2), pooled B x d2)`` for an SDXL base."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL always uses the penultimate layer
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds; only the last encoder's is kept
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(
    unet,
    text_encoder_2,
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int],
    target_size: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The 1 x 6 micro-conditioning vector ``(orig_h, orig_w, top, left, target_h, target_w)``."""
    ids = [*original_size, *crops_coords_top_left, *target_size]
    got = unet.config.addition_time_embed_dim * len(ids) + text_encoder_2.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if got != expected:
        raise ValueError(
            f"the SDXL UNet's add_embedding takes {expected} features but {len(ids)} time ids x "
            f"addition_time_embed_dim={unet.config.addition_time_embed_dim} + text_encoder_2 projection_dim="
            f"{text_encoder_2.config.projection_dim} = {got}: the UNet and text_encoder_2 do not belong together"
        )
    return torch.tensor([ids], dtype=dtype)
