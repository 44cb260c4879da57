"""One small interface per DiT family, called by the pipelines and training alike.

Latents cross this interface unpacked (``B x 16 x h x w``), the keep mask as ``B x 1 x h x w`` (1 = keep)
and time as the flow-matching ``sigma`` in [0, 1] (``x_t = (1 - sigma) x_0 + sigma noise``); each family
converts to its transformer's layout (SD3: timestep ``1000 sigma``; Flux: packed tokens, image ids,
``sigma`` itself and the guidance embedding).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch

from brushnet.dit.blocks import Scale
from brushnet.dit.flux_model import BrushNetFluxModel, BrushNetFluxOutput
from brushnet.dit.injection import flux_forward_with_brushnet, sd3_forward_with_brushnet
from brushnet.dit.latents import image_ids, pack, unpack
from brushnet.dit.loading import base_family
from brushnet.dit.sd3_model import BrushNetSD3Model, BrushNetSD3Output
from brushnet.dit.text import DiTText, encode_prompts


class BranchFamily(Protocol):
    """What the trainer and the pipelines call; ``SD3Family`` and ``FluxFamily`` implement it."""

    name: ClassVar[str]
    branch_class: ClassVar[type]
    pipeline_class_name: ClassVar[str]  # the stock diffusers pipeline that loads the base folder
    block_class_names: ClassVar[tuple[str, ...]]  # base and branch blocks: the FSDP2 / checkpointing units

    @staticmethod
    def build_branch(transformer, num_layers: int | None = None, branch_text: bool = False) -> Any: ...

    @staticmethod
    def encode_text(components: Mapping[str, Any], prompts: Sequence[str]) -> DiTText:
        """Prompts through the base's frozen text encoders (on their device); see :mod:`brushnet.dit.text`."""
        ...

    @staticmethod
    def residuals(
        branch, noisy, masked_latents, keep, sigma, text, guidance=None, conditioning_scale=1.0
    ) -> Any: ...

    @staticmethod
    def predict(transformer, noisy, sigma, text, residuals=None, guidance=None) -> torch.Tensor: ...


def _batch(value: float | torch.Tensor, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.as_tensor(value, device=device, dtype=dtype)
    return t.expand(batch) if t.ndim == 0 else t.to(device=device, dtype=dtype)


class SD3Family:
    """SD3 / SD3.5: ``SD3Transformer2DModel`` + :class:`BrushNetSD3Model`."""

    name: ClassVar[str] = "sd3"
    branch_class: ClassVar[type] = BrushNetSD3Model
    pipeline_class_name: ClassVar[str] = "StableDiffusion3Pipeline"
    block_class_names: ClassVar[tuple[str, ...]] = ("JointTransformerBlock", "SD3ImageBlock")

    @staticmethod
    def build_branch(
        transformer, num_layers: int | None = None, branch_text: bool = False
    ) -> BrushNetSD3Model:
        return BrushNetSD3Model.from_transformer(transformer, num_layers=num_layers, branch_text=branch_text)

    @staticmethod
    def encode_text(components: Mapping[str, Any], prompts: Sequence[str]) -> DiTText:
        return encode_prompts("sd3", components, prompts)

    @staticmethod
    def residuals(
        branch: BrushNetSD3Model,
        noisy: torch.Tensor,
        masked_latents: torch.Tensor,
        keep: torch.Tensor,
        sigma: float | torch.Tensor,
        text: DiTText,
        guidance: float | None = None,
        conditioning_scale: Scale = 1.0,
    ) -> BrushNetSD3Output:
        dtype = branch.dtype
        return branch(
            noisy.to(dtype),
            torch.cat([masked_latents, keep], dim=1).to(dtype),
            _batch(sigma, noisy.shape[0], noisy.device) * 1000,
            text.pooled.to(dtype),
            encoder_hidden_states=text.embeds.to(dtype) if branch.config.branch_text else None,
            conditioning_scale=conditioning_scale,
        )

    @staticmethod
    def predict(
        transformer,
        noisy: torch.Tensor,
        sigma: float | torch.Tensor,
        text: DiTText,
        residuals: BrushNetSD3Output | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """The base's velocity prediction (``noise - x_0``), with the branch's residuals when given."""
        dtype = transformer.dtype
        args = (
            noisy.to(dtype),
            _batch(sigma, noisy.shape[0], noisy.device) * 1000,
            text.embeds.to(dtype),
            text.pooled.to(dtype),
        )
        if residuals is None:
            x, t, embeds, pooled = args
            return transformer(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        return sd3_forward_with_brushnet(transformer, *args, block_residuals=residuals.block_residuals)


class FluxFamily:
    """Flux.1 dev / schnell: ``FluxTransformer2DModel`` + :class:`BrushNetFluxModel`."""

    name: ClassVar[str] = "flux"
    branch_class: ClassVar[type] = BrushNetFluxModel
    pipeline_class_name: ClassVar[str] = "FluxPipeline"
    block_class_names: ClassVar[tuple[str, ...]] = (
        "FluxTransformerBlock",
        "FluxSingleTransformerBlock",
        "FluxImageBlock",
    )

    @staticmethod
    def build_branch(
        transformer, num_layers: int | None = None, branch_text: bool = False
    ) -> BrushNetFluxModel:
        return BrushNetFluxModel.from_transformer(transformer, num_layers=num_layers, branch_text=branch_text)

    @staticmethod
    def encode_text(components: Mapping[str, Any], prompts: Sequence[str]) -> DiTText:
        return encode_prompts("flux", components, prompts)

    @staticmethod
    def _guidance(config, guidance: float | None, batch: int, device) -> torch.Tensor | None:
        if not config.guidance_embeds:
            return None
        if guidance is None:
            raise ValueError(
                "a guidance-distilled Flux base (guidance_embeds: true, dev) needs a guidance value"
            )
        return _batch(guidance, batch, device)

    @staticmethod
    def residuals(
        branch: BrushNetFluxModel,
        noisy: torch.Tensor,
        masked_latents: torch.Tensor,
        keep: torch.Tensor,
        sigma: float | torch.Tensor,
        text: DiTText,
        guidance: float | None = None,
        conditioning_scale: Scale = 1.0,
    ) -> BrushNetFluxOutput:
        dtype, b, size = branch.dtype, noisy.shape[0], noisy.shape[-2:]
        with_text = branch.config.branch_text
        return branch(
            pack(noisy).to(dtype),
            torch.cat([pack(masked_latents), pack(keep.to(masked_latents.dtype))], dim=-1).to(dtype),
            _batch(sigma, b, noisy.device),
            image_ids(size, noisy.device),
            text.pooled.to(dtype),
            guidance=FluxFamily._guidance(branch.config, guidance, b, noisy.device),
            encoder_hidden_states=text.embeds.to(dtype) if with_text else None,
            txt_ids=text.txt_ids if with_text else None,
            conditioning_scale=conditioning_scale,
        )

    @staticmethod
    def predict(
        transformer,
        noisy: torch.Tensor,
        sigma: float | torch.Tensor,
        text: DiTText,
        residuals: BrushNetFluxOutput | None = None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        dtype, b, size = transformer.dtype, noisy.shape[0], noisy.shape[-2:]
        kwargs = dict(
            hidden_states=pack(noisy).to(dtype),
            timestep=_batch(sigma, b, noisy.device),
            encoder_hidden_states=text.embeds.to(dtype),
            pooled_projections=text.pooled.to(dtype),
            img_ids=image_ids(size, noisy.device),
            txt_ids=text.txt_ids,
            guidance=FluxFamily._guidance(transformer.config, guidance, b, noisy.device),
        )
        if residuals is None:
            out = transformer(**kwargs, return_dict=False)[0]
        else:
            out = flux_forward_with_brushnet(
                transformer,
                **kwargs,
                block_residuals=residuals.block_residuals,
                single_block_residuals=residuals.single_block_residuals,
            )
        return unpack(out, size)


FAMILIES: dict[str, type[BranchFamily]] = {"sd3": SD3Family, "flux": FluxFamily}


_CLASS_FAMILY = {
    "SD3Transformer2DModel": "sd3",
    "BrushNetSD3Model": "sd3",
    "FluxTransformer2DModel": "flux",
    "BrushNetFluxModel": "flux",
}


def family_of(base: str | os.PathLike | Any) -> type[SD3Family] | type[FluxFamily]:
    """The family of a base folder / hub id, or of a transformer or branch model."""
    if isinstance(base, (str, os.PathLike)):
        name = base_family(base)
        if name not in FAMILIES:
            raise ValueError(f"{str(base)!r} is a {name} base, not a DiT (SD3 / Flux) base")
        return FAMILIES[name]
    name = _CLASS_FAMILY.get(type(base).__name__)
    if name is None:
        raise TypeError(f"cannot tell the DiT family of a {type(base).__name__}")
    return FAMILIES[name]


def pipeline_class(family: str) -> type:
    """The BrushNet inpainting pipeline of the DiT family ``"sd3"`` or ``"flux"``."""
    from brushnet.dit.pipeline_flux import BrushNetFluxInpaintPipeline
    from brushnet.dit.pipeline_sd3 import BrushNetSD3InpaintPipeline

    classes = {"sd3": BrushNetSD3InpaintPipeline, "flux": BrushNetFluxInpaintPipeline}
    if family not in classes:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {sorted(classes)}")
    return classes[family]


def load_dit_base(
    name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None, with_t5: bool = True
) -> dict[str, Any]:
    """The components of an SD3 / Flux base folder or hub id, loaded by the stock diffusers pipeline class.

    ``with_t5=False`` (SD3 only) skips T5 (its tokens become zeros; saves 4.7B parameters).
    """
    import diffusers

    from brushnet.loading import BaseModelError, resolve_pretrained

    folder = resolve_pretrained(name_or_path)
    family = family_of(folder)
    kw: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if not with_t5:
        if family is not SD3Family:
            raise ValueError("with_t5=False is for SD3 bases only: Flux's prompt tokens come from T5")
        kw.update(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = getattr(diffusers, family.pipeline_class_name).from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"could not load the {family.name} base model from {folder}: {e}") from e
    return dict(pipe.components)
