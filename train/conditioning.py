"""Text (and SDXL micro-) conditioning of the frozen UNet and the branch during training.

* SD 1.5 / 2.x: the text encoder's last hidden state (official ``train_brushnet.py``:
  ``text_encoder(batch["input_ids"], return_dict=False)[0]``).
* SDXL: both encoders' *penultimate* hidden states concatenated on the feature axis, the pooled (projected)
  output of ``text_encoder_2`` as ``text_embeds``, and six ``time_ids`` per sample: original size (h, w),
  crop top-left (top, left), target size (h, w) (official ``train_brushnet_sdxl.py`` /
  diffusers ``StableDiffusionXLPipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextConditioning:
    """What the UNet and the branch receive besides the latents."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


def sdxl_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """B x 6 ``(orig_h, orig_w, top, left, target_h, target_w)`` from the batch's B x 2 tensors."""
    if original_size.shape != crop_top_left.shape or original_size.ndim != 2 or original_size.shape[1] != 2:
        raise ValueError(
            "original_size and crop_top_left must both be B x 2, got "
            f"{tuple(original_size.shape)} and {tuple(crop_top_left.shape)}"
        )
    target = torch.tensor(target_size, dtype=original_size.dtype, device=original_size.device)
    return torch.cat([original_size, crop_top_left, target.expand(original_size.shape[0], 2)], dim=1)


@torch.no_grad()
def encode_text(
    text_encoder, input_ids: torch.Tensor, text_encoder_2=None, input_ids_2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states, pooled or None)``; SDXL when ``text_encoder_2`` is given."""
    if text_encoder_2 is None:
        return text_encoder(input_ids, return_dict=False)[0], None
    if input_ids_2 is None:
        raise ValueError(
            "an SDXL base needs batch['input_ids_2'] (tokenizer_2): is the DataModule's tokenizer "
            "the same SDXL base?"
        )
    first = text_encoder(input_ids, output_hidden_states=True)
    second = text_encoder_2(input_ids_2, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return hidden, second[0]  # CLIPTextModelWithProjection: text_embeds (pooled, projected)


def text_conditioning(
    batch: dict,
    text_encoder,
    text_encoder_2=None,
    *,
    target_size: tuple[int, int],
    dtype: torch.dtype,
) -> TextConditioning:
    """The conditioning of one training batch (see the module docstring)."""
    hidden, pooled = encode_text(text_encoder, batch["input_ids"], text_encoder_2, batch.get("input_ids_2"))
    if pooled is None:
        return TextConditioning(hidden.to(dtype))
    time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target_size)
    return TextConditioning(
        hidden.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(hidden.device, dtype)}
    )
