"""The base-model family the training module trains on, picked once from the base folder.

:class:`train.module.BrushNetTrainingModule` holds one :class:`FamilyParts` (:class:`UNetParts` for
SD 1.5 / 2.x / SDXL, :class:`DiTParts` for SD3 / Flux) and delegates to it everything that depends on
the family: the frozen models, building the branch, the loss and the inference pipeline.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from brushnet.dit.loading import base_family
from train.family_dit import UNET_ONLY, DiTParts
from train.family_unet import DIT_ONLY, UNetParts


class FamilyParts(Protocol):
    """Called with the module ``m`` whose attributes hold the frozen models (tools may replace them)."""

    name: str
    attributes: dict[
        str, Any
    ]  # set on the module under these names (vae, unet / transformer, tokenizer, ...)
    denoiser: str  # the frozen UNet / transformer (train mode, gradient checkpointing)
    encoders: tuple[str, ...]  # the frozen VAE and text encoders (always eval mode; None when absent)

    def build_branch(self, m: Any) -> nn.Module: ...

    def loss(
        self, m: Any, batch: dict, generator: torch.Generator, use_branch: bool = True
    ) -> torch.Tensor: ...

    def pipeline(self, m: Any, branch: nn.Module, scheduler: str | None) -> Any: ...


def load_family(base: str, hp: Any) -> FamilyParts:
    """The parts of ``base``; an option of another family set away from its default is one clear error."""
    name = base_family(base)
    cls, foreign = (UNetParts, DIT_ONLY) if name == "unet" else (DiTParts, UNET_ONLY)
    wrong = {k: hp[k] for k, unused in foreign.items() if hp.get(k, unused) != unused}
    if wrong:
        raise ValueError(
            f"{base} is a {name} base: model options {wrong} apply to other base families only "
            f"(leave them at { ({k: foreign[k] for k in wrong}) })"
        )
    return cls(base, hp)
