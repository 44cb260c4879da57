"""Text (and SDXL micro-) conditioning of the UNet and the branch: one implementation for the trainer and
the pipeline, so what a branch is trained on is exactly what it sees at inference.

* Tokens: every prompt padded/truncated to the tokenizer's ``model_max_length`` (77 for CLIP).
* SD 1.5 / 2.x: the text encoder's last hidden state (official ``train_brushnet.py``:
  ``text_encoder(batch["input_ids"], return_dict=False)[0]``; diffusers' ``StableDiffusionPipeline`` with
  ``clip_skip=None``).
* SDXL: both encoders' *penultimate* hidden states concatenated on the feature axis, the pooled (projected)
  output of ``text_encoder_2`` as ``text_embeds``, and six ``time_ids`` per sample: original size (h, w),
  crop top-left (top, left), target size (h, w) (official ``train_brushnet_sdxl.py`` and
  ``pipeline_brushnet_sd_xl.py``, diffusers' ``StableDiffusionXLPipeline``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from brushnet.loading import load_tokenizer, resolve_pretrained


@dataclass
class TextConditioning:
    """What the UNet and the branch receive besides the latents."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


class CaptionTokenizers:
    """The base model's CLIP tokenizer(s): ``tokenizer`` and, for SDXL, ``tokenizer_2``."""

    def __init__(self, tokenizer, tokenizer_2=None) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> CaptionTokenizers:
        """``tokenizer/`` (and ``tokenizer_2/`` when present) of a base model folder or hub id."""
        if not str(name_or_path):
            raise ValueError("no tokenizer given: pass the base model's folder or hub id")
        folder = resolve_pretrained(name_or_path)
        second = load_tokenizer(folder, "tokenizer_2") if (folder / "tokenizer_2").is_dir() else None
        return cls(load_tokenizer(folder, "tokenizer"), second)

    def __call__(self, text: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids"[, "input_ids_2"]}``: int64 L for one string, B x L for a list of them."""
        out = {"input_ids": token_ids(self.tokenizer, text)}
        if self.tokenizer_2 is not None:
            out["input_ids_2"] = token_ids(self.tokenizer_2, text)
        return out


def load_caption_tokenizers(name_or_path: str | os.PathLike):
    """The tokenizers whose ids a base's training batches carry: :class:`CaptionTokenizers` for a UNet
    base, :class:`brushnet.dit.text.DiTTokenizers` for an SD3 / Flux one (a ``transformer/`` folder)."""
    if not str(name_or_path):
        raise ValueError("no tokenizer given: pass the base model's folder or hub id")
    if (resolve_pretrained(name_or_path) / "transformer" / "config.json").is_file():
        from brushnet.dit.text import DiTTokenizers

        return DiTTokenizers.from_pretrained(name_or_path)
    return CaptionTokenizers.from_pretrained(name_or_path)


def token_ids(tokenizer, text: str | Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's context length: L for a string, B x L for a list."""
    texts = [text] if isinstance(text, str) else list(text)
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    ids = torch.tensor(ids, dtype=torch.int64)
    return ids[0] if isinstance(text, str) else ids


@torch.no_grad()
def encode_text(
    text_encoder, input_ids: torch.Tensor, text_encoder_2=None, input_ids_2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states, pooled or None)``; SDXL when ``text_encoder_2`` is given."""
    if text_encoder_2 is None:
        return text_encoder(input_ids, return_dict=False)[0], None
    if input_ids_2 is None:
        raise ValueError(
            "an SDXL base needs input_ids_2 (from tokenizer_2): were the captions tokenized with the "
            "same SDXL base?"
        )
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, second[0]  # CLIPTextModelWithProjection: text_embeds (pooled, projected)


def sdxl_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """B x 6 ``(orig_h, orig_w, top, left, target_h, target_w)`` from B x 2 sizes and crop corners."""
    if original_size.shape != crop_top_left.shape or original_size.ndim != 2 or original_size.shape[1] != 2:
        raise ValueError(
            "original_size and crop_top_left must both be B x 2, got "
            f"{tuple(original_size.shape)} and {tuple(crop_top_left.shape)}"
        )
    target = torch.tensor(target_size, dtype=original_size.dtype, device=original_size.device)
    return torch.cat([original_size, crop_top_left, target.expand(original_size.shape[0], 2)], dim=1)


def check_sdxl_unet_fits(unet, text_encoder_2) -> None:
    """Raise when 6 time ids + ``text_encoder_2``'s pooled output do not fit the UNet's ``add_embedding``."""
    got = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if got != expected:
        raise ValueError(
            f"the SDXL UNet's add_embedding takes {expected} features but 6 time ids x "
            f"addition_time_embed_dim={unet.config.addition_time_embed_dim} + text_encoder_2 projection_dim="
            f"{text_encoder_2.config.projection_dim} = {got}: the UNet and text_encoder_2 do not belong together"
        )


def text_conditioning(
    text_encoder,
    tokens: dict[str, torch.Tensor],
    text_encoder_2=None,
    *,
    time_ids: torch.Tensor | None = None,
    dtype: torch.dtype,
) -> TextConditioning:
    """The conditioning for B x L ``tokens`` (:class:`CaptionTokenizers` output); SDXL needs B x 6 ``time_ids``."""
    hidden, pooled = encode_text(text_encoder, tokens["input_ids"], text_encoder_2, tokens.get("input_ids_2"))
    if pooled is None:
        return TextConditioning(hidden.to(dtype))
    if time_ids is None:
        raise ValueError("an SDXL base needs time_ids (see sdxl_time_ids)")
    added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(hidden.device, dtype)}
    return TextConditioning(hidden.to(dtype), added)


def prompt_conditioning(
    tokenizers: CaptionTokenizers,
    text_encoder,
    text_encoder_2,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    guidance: bool,
    zeros_for_empty_negative: bool,
    time_ids: torch.Tensor | None,
    repeats: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> TextConditioning:
    """Inference conditioning of ``prompts``, each repeated ``repeats`` times (1 x 6 ``time_ids`` for SDXL).

    With classifier-free ``guidance`` the negative half comes first. An SDXL base given no negative prompts
    gets zero negative embeddings when ``zeros_for_empty_negative`` (diffusers' SDXL pipeline's
    ``force_zeros_for_empty_prompt``); otherwise the negatives are the prompts given or empty strings.
    """

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = {k: v.to(device) for k, v in tokenizers(texts).items()}
        return encode_text(text_encoder, tokens["input_ids"], text_encoder_2, tokens.get("input_ids_2"))

    negatives = negative_prompts or [""] * len(prompts)
    if text_encoder_2 is None:
        hidden, pooled = encode(negatives + prompts if guidance else prompts)
    else:
        hidden, pooled = encode(prompts)
        if guidance:
            if negative_prompts is None and zeros_for_empty_negative:
                neg_hidden, neg_pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
            else:
                neg_hidden, neg_pooled = encode(negatives)
            hidden, pooled = torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled])
    hidden = hidden.repeat_interleave(repeats, dim=0).to(dtype)
    if pooled is None:
        return TextConditioning(hidden)
    if time_ids is None:
        raise ValueError("an SDXL base needs time_ids (see sdxl_time_ids)")
    pooled = pooled.repeat_interleave(repeats, dim=0).to(dtype)
    time_ids = time_ids.to(device, dtype).repeat(pooled.shape[0], 1)
    return TextConditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})
