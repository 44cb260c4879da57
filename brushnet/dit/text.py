"""Prompt conditioning for SD3 (CLIP-L + CLIP-G + optional T5) and Flux (CLIP-L pooled + T5).

Shared by the DiT pipelines and training: :class:`DiTTokenizers` (data workers) -> :func:`encode_tokens`
(frozen encoders), or both at once with :func:`encode_prompts`. The layouts follow diffusers'
``StableDiffusion3Pipeline.encode_prompt`` and ``FluxPipeline.encode_prompt`` (tested equal to them):

* SD3: each CLIP gives its penultimate hidden state and its projected pooled output; the two hidden states
  are concatenated on the channel axis, zero-padded to T5's width and put before T5's tokens; the pooled
  outputs are concatenated. Without T5 its tokens are zeros (what SD3 does when ``text_encoder_3`` is
  None; the SD3 paper reports the cost mostly on typography and long, detailed prompts).
* Flux: CLIP-L's pooled output and T5's last hidden state; ``txt_ids`` are zeros.
"""

from __future__ import annotations

import json
import os
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


# Tokenizers per family, named as the diffusers pipeline's components; the last one is T5.
TOKENIZERS = {"sd3": ("tokenizer", "tokenizer_2", "tokenizer_3"), "flux": ("tokenizer", "tokenizer_2")}
T5_MAX_LENGTH = {"sd3": SD3_T5_MAX_LENGTH, "flux": FLUX_T5_MAX_LENGTH}


def _key(tokenizer_name: str) -> str:
    """``tokenizer`` -> ``input_ids``, ``tokenizer_2`` -> ``input_ids_2`` (the UNet trainer's batch keys)."""
    return "input_ids" + tokenizer_name[len("tokenizer") :]


class DiTTokenizers:
    """Prompt -> token ids for one family: CLIP ids padded to 77, T5 ids padded to the family's length.

    Called in data-loader workers like :class:`brushnet.conditioning.CaptionTokenizers`; a missing T5 (SD3
    loaded without it) simply gives no ``input_ids_3``.
    """

    def __init__(self, family: str, components: Mapping[str, Any]) -> None:
        if family not in TOKENIZERS:
            raise ValueError(f"unknown DiT family {family!r}; expected one of {sorted(TOKENIZERS)}")
        self.family = family
        self.tokenizers = {n: components.get(n) for n in TOKENIZERS[family] if components.get(n) is not None}

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> DiTTokenizers:
        """The tokenizers of an SD3 / Flux base folder or hub id, without loading any model.

        CLIP ones through :func:`brushnet.loading.load_tokenizer` (checked), T5 by its class in
        ``model_index.json`` (diffusers' layout); an SD3 folder without ``tokenizer_3/`` gives no T5 ids.
        """
        import transformers

        from brushnet.dit.loading import base_family
        from brushnet.loading import load_tokenizer, resolve_pretrained

        folder = resolve_pretrained(name_or_path)
        family = base_family(folder)
        t5 = TOKENIZERS[family][-1]
        index = json.loads((folder / "model_index.json").read_text())
        found = {}
        for name in TOKENIZERS[family]:
            if name != t5:
                found[name] = load_tokenizer(folder, name)
            elif (folder / name).is_dir() and index.get(name, [None, None])[1]:
                found[name] = getattr(transformers, index[name][1]).from_pretrained(folder / name)
        return cls(family, found)

    def __call__(self, text: str | Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        t5 = TOKENIZERS[self.family][-1]
        out = {}
        for name, tok in self.tokenizers.items():
            length = T5_MAX_LENGTH[self.family] if name == t5 else tok.model_max_length
            ids = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            out[_key(name)] = ids.input_ids[0] if isinstance(text, str) else ids.input_ids
        return out


def _clip(encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden state, projected pooled output) of a ``CLIPTextModelWithProjection``."""
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


@torch.no_grad()
def encode_tokens(family: str, components: Mapping[str, Any], tokens: Mapping[str, torch.Tensor]) -> DiTText:
    """The conditioning of B x L ``tokens`` (:class:`DiTTokenizers` output) with the base's frozen encoders."""
    device = components["text_encoder"].device
    tokens = {k: v.to(device) for k, v in tokens.items()}
    if family == "flux":
        pooled = components["text_encoder"](tokens["input_ids"], output_hidden_states=False).pooler_output
        embeds = components["text_encoder_2"](tokens["input_ids_2"])[0]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
        return DiTText(embeds, pooled.to(embeds.dtype), txt_ids)
    hidden_l, pooled_l = _clip(components["text_encoder"], tokens["input_ids"])
    hidden_g, pooled_g = _clip(components["text_encoder_2"], tokens["input_ids_2"])
    clip = torch.cat([hidden_l, hidden_g], dim=-1)
    t5 = components.get("text_encoder_3")
    if t5 is None or "input_ids_3" not in tokens:
        width = components["transformer"].config.joint_attention_dim
        t5_embeds = torch.zeros(clip.shape[0], SD3_T5_MAX_LENGTH, width, device=device, dtype=clip.dtype)
    else:
        t5_embeds = t5(tokens["input_ids_3"])[0]
    clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    embeds = torch.cat([clip.to(t5_embeds.dtype), t5_embeds], dim=-2)
    return DiTText(embeds, torch.cat([pooled_l, pooled_g], dim=-1).to(t5_embeds.dtype))


def encode_prompts(family: str, components: Mapping[str, Any], prompts: Sequence[str]) -> DiTText:
    """Tokenize and encode ``prompts`` (the pipelines' path; the trainer tokenizes in its data workers)."""
    return encode_tokens(family, components, DiTTokenizers(family, components)(list(prompts)))
