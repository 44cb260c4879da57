"""`BrushNetSD3InpaintPipeline`: inpainting with a BrushNet branch on a stock SD3 / SD3.5 base.

Classifier-free guidance (negative half first, as ``StableDiffusion3Pipeline``), default 28 steps and
guidance 7.0 (that pipeline's defaults); T5 optional (``with_t5=False``: zeros in its place). The loop is
:class:`brushnet.dit.pipeline_base.DiTInpaintPipeline`.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch

from brushnet.dit.family import SD3Family, load_dit_base
from brushnet.dit.loading import load_dit_branch
from brushnet.dit.pipeline_base import DiTInpaintPipeline
from brushnet.dit.sd3_model import BrushNetSD3Model


class BrushNetSD3InpaintPipeline(DiTInpaintPipeline):
    """SD3 / SD3.5 + :class:`BrushNetSD3Model`. Build it with :meth:`from_base`."""

    family = SD3Family
    uses_cfg = True
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->brushnet->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_3", "tokenizer_3"]

    def __init__(
        self,
        transformer,
        brushnet: BrushNetSD3Model,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            brushnet=brushnet,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self._check()

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        brushnet: BrushNetSD3Model | str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        with_t5: bool = True,
    ) -> BrushNetSD3InpaintPipeline:
        """A pipeline from an SD3 base (folder or hub id) and a branch (model or folder)."""
        if not isinstance(brushnet, BrushNetSD3Model):
            brushnet = load_dit_branch(brushnet, torch_dtype=torch_dtype)
        parts = load_dit_base(base, torch_dtype=torch_dtype, with_t5=with_t5)
        keep = (
            "transformer",
            "scheduler",
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
        )
        return cls(
            brushnet=brushnet,
            text_encoder_3=parts.get("text_encoder_3"),
            tokenizer_3=parts.get("tokenizer_3"),
            **{k: parts[k] for k in keep},
        )
