"""Prompt conditioning for SD3 (CLIP-L + CLIP-G + optional T5) and Flux (CLIP-L pooled + T5).

Shared by the DiT pipelines and training. The layouts follow diffusers' ``StableDiffusion3Pipeline.encode_prompt``
and ``FluxPipeline.encode_prompt``:

* SD3: each CLIP gives its penultimate hidden state and its projected pooled output; the two hidden states
  are concatenated on the channel axis, zero-padded to T5's width and put before T5's tokens; the pooled
  outputs are concatenated. Without T5 its tokens are zeros (what SD3 does when ``text_encoder_3`` is
  None; the SD3 paper reports the cost mostly on typography and long, detailed prompts).
* Flux: CLIP-L's pooled output and T5's last hidden state; ``txt_ids`` are zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

SD3_T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default
FLUX_T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length default (dev)


@dataclass
class DiTText:
    """Prompt conditioning of one batch: ``embeds`` B x seq x joint dim, ``pooled`` B x pooled dim."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor | None = None  # Flux: seq x 3

    def to(self, device=None, dtype=None) -> DiTText:
        ids = self.txt_ids.to(device=device, dtype=dtype) if self.txt_ids is not None else None
        return DiTText(
            self.embeds.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype), ids
        )

    @staticmethod
    def cat(parts: Sequence[DiTText]) -> DiTText:
        """Batch concatenation (e.g. negative then positive for classifier-free guidance)."""
        return DiTText(
            torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]), parts[0].txt_ids
        )

    def repeat_interleave(self, n: int) -> DiTText:
        return DiTText(self.embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0), self.txt_ids)


def _ids(tokenizer, prompts: Sequence[str], max_length: int, device) -> torch.Tensor:
    out = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids.to(device)


def _clip(tokenizer, encoder, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden state, projected pooled output) of a ``CLIPTextModelWithProjection``."""
    out = encoder(_ids(tokenizer, prompts, tokenizer.model_max_length, device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode_prompt_sd3(
    components: Mapping[str, Any],
    prompts: Sequence[str],
    device,
    joint_attention_dim: int,
    max_sequence_length: int = SD3_T5_MAX_LENGTH,
) -> DiTText:
    """SD3 conditioning from pipeline components named as in ``StableDiffusion3Pipeline``."""
    hidden_l, pooled_l = _clip(components["tokenizer"], components["text_encoder"], prompts, device)
    hidden_g, pooled_g = _clip(components["tokenizer_2"], components["text_encoder_2"], prompts, device)
    clip = torch.cat([hidden_l, hidden_g], dim=-1)
    t5 = components.get("text_encoder_3")
    if t5 is None:
        t5_embeds = torch.zeros(len(prompts), max_sequence_length, joint_attention_dim, device=device)
    else:
        t5_embeds = t5(_ids(components["tokenizer_3"], prompts, max_sequence_length, device))[0]
    clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    embeds = torch.cat([clip.to(t5_embeds.dtype), t5_embeds], dim=-2)
    return DiTText(embeds, torch.cat([pooled_l, pooled_g], dim=-1))


def encode_prompt_flux(
    components: Mapping[str, Any],
    prompts: Sequence[str],
    device,
    max_sequence_length: int = FLUX_T5_MAX_LENGTH,
) -> DiTText:
    """Flux conditioning from pipeline components named as in ``FluxPipeline``."""
    tokenizer = components["tokenizer"]
    clip_ids = _ids(tokenizer, prompts, tokenizer.model_max_length, device)
    pooled = components["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
    embeds = components["text_encoder_2"](
        _ids(components["tokenizer_2"], prompts, max_sequence_length, device)
    )[0]
    txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
    return DiTText(embeds, pooled.to(embeds.dtype), txt_ids)
