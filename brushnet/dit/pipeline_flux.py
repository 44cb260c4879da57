"""`BrushNetFluxInpaintPipeline`: inpainting with a BrushNet branch on a stock Flux.1 base.

No classifier-free guidance: Flux dev takes the guidance scale as an embedding (default 3.5, 28 steps:
``FluxPipeline``'s defaults), schnell takes none. The resolution-dependent shift ``mu`` of the scheduler
follows ``FluxPipeline`` (diffusers' ``calculate_shift``). The loop is
:class:`brushnet.dit.pipeline_base.DiTInpaintPipeline`.
"""

from __future__ import annotations

import os

import torch

from brushnet.dit.family import FluxFamily, load_dit_base
from brushnet.dit.flux_model import BrushNetFluxModel
from brushnet.dit.loading import load_dit_branch
from brushnet.dit.pipeline_base import DiTInpaintPipeline


class BrushNetFluxInpaintPipeline(DiTInpaintPipeline):
    """Flux.1 + :class:`BrushNetFluxModel`. Build it with :meth:`from_base`."""

    family = FluxFamily
    uses_cfg = False
    model_cpu_offload_seq = "text_encoder->text_encoder_2->brushnet->transformer->vae"

    def __init__(
        self,
        transformer,
        brushnet: BrushNetFluxModel,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
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
        )
        self._check()

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        brushnet: BrushNetFluxModel | str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
    ) -> BrushNetFluxInpaintPipeline:
        """A pipeline from a Flux base (folder or hub id) and a branch (model or folder)."""
        if not isinstance(brushnet, BrushNetFluxModel):
            brushnet = load_dit_branch(brushnet, torch_dtype=torch_dtype)
        parts = load_dit_base(base, torch_dtype=torch_dtype)
        keep = (
            "transformer",
            "scheduler",
            "vae",
            "text_encoder",
            "tokenizer",
            "text_encoder_2",
            "tokenizer_2",
        )
        return cls(brushnet=brushnet, **{k: parts[k] for k in keep})
