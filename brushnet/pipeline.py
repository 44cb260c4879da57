"""`BrushNetInpaintPipeline`: text-guided inpainting with a BrushNet branch on a stock SD 1.5 / SD 2.x / SDXL.

Behaviour follows the official ``StableDiffusionBrushNetPipeline`` / ``StableDiffusionXLBrushNetPipeline``
(TencentARC/BrushNet ``src/diffusers/pipelines/brushnet``) and its example scripts:

* the user's mask is white = inpaint; the pipeline builds the masked image itself (hole black, i.e. -1 in
  VAE input space, like ``image * (1 - mask)`` in ``examples/brushnet/test_brushnet.py``), encodes it
  with the VAE (times ``scaling_factor``) and appends the keep-mask (1 = keep) resized to latent size
  with nearest interpolation;
* at every step the branch sees ``[masked latents, mask]`` (duplicated for classifier-free guidance) and
  its residuals are added to the frozen UNet (:func:`brushnet.unet_forward_with_brushnet`);
* ``control_guidance_start/end``: outside that fraction of the steps the branch's scale is 0 (same keep
  rule as the ControlNet pipelines); a step whose scale is 0 everywhere skips the branch, which gives the
  plain UNet's output exactly (adding zero residuals changes nothing);
* after decoding, blurred blending (on by default, ``blend=False`` to switch it off) pastes the result
  into the original image with a Gaussian-feathered mask, so pixels far from the mask are the input's.

Unlike the official pipeline, the output always has the input image's size: images whose sides are not
multiples of the VAE factor (8) are processed at the nearest smaller multiple and resized back before
blending. One class serves every base; an SDXL base is recognised by its ``text_encoder_2``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput

from brushnet.conditioning import (
    CaptionTokenizers,
    check_sdxl_unet_fits,
    prompt_conditioning,
    sdxl_time_ids,
)
from brushnet.guidance import all_zero, guidance_keep, predict_with_branch, step_scale
from brushnet.images import ImageInput, check_call_options, prepare_inpaint_inputs, prompt_lists, resize_rgb
from brushnet.injection import branch_condition
from brushnet.loading import check_branch_matches_unet, load_base_components, load_brushnet
from brushnet.masks import blurred_blend
from brushnet.model import BrushNetModel

# Short names accepted by `scheduler=` / `brushnet inpaint --scheduler`; any diffusers scheduler class name
# (e.g. "HeunDiscreteScheduler") works too.
SCHEDULERS = {
    "unipc": "UniPCMultistepScheduler",  # official examples/brushnet/test_brushnet.py
    "dpm++": "DPMSolverMultistepScheduler",  # official test_brushnet_sdxl.py
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


# Config overrides of a short name. `unipc`: the official BrushNet ran the UniPC of its vendored diffusers 0.27,
# whose set_timesteps ended at the training schedule's smallest sigma; diffusers >= 0.28 added
# `final_sigmas_type` with default "zero", so reproducing the paper needs "sigma_min" (the class name
# "UniPCMultistepScheduler" gives stock diffusers).
SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {"unipc": {"final_sigmas_type": "sigma_min"}}


def make_scheduler(name: str | SchedulerMixin, base_config: Any) -> SchedulerMixin:
    """A scheduler by short name or diffusers class name, built from the base model's scheduler config."""
    if isinstance(name, SchedulerMixin):
        return name
    return _scheduler_class(name).from_config(base_config, **SCHEDULER_OVERRIDES.get(name.lower(), {}))


def _scheduler_class(name: str) -> type[SchedulerMixin]:
    import diffusers

    cls = getattr(diffusers, SCHEDULERS.get(name.lower(), name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"unknown scheduler {name!r}: use one of {sorted(SCHEDULERS)} or a diffusers scheduler class name"
        )
    return cls


@dataclass
class BrushNetInpaintOutput(BaseOutput):
    """``images``: list of PIL images, uint8 N x H x W x 3 array (``output_type="np"``) or latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class BrushNetInpaintPipeline(DiffusionPipeline):
    """Inpainting with a BrushNet branch: SD 1.5 / SD 2.x (no ``text_encoder_2``) or SDXL bases.

    Build it from a base model and a branch with :meth:`from_base` (or, as in diffusers' ControlNet
    pipelines, ``from_pretrained(base, brushnet=branch)``: the same method), or with ``from_pretrained`` on
    a folder written by ``save_pretrained``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->brushnet->unet->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_2", "tokenizer_2"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        brushnet: BrushNetModel,
        scheduler: SchedulerMixin,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        if (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError(
                "an SDXL base needs both text_encoder_2 and tokenizer_2 (or neither for SD 1.5/2.x)"
            )
        check_branch_matches_unet(brushnet, unet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            brushnet=brushnet,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        # SDXL only (as in diffusers' StableDiffusionXLPipeline): no negative prompt -> zero embeddings.
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """A saved pipeline folder (diffusers' ``from_pretrained``); with ``brushnet=`` a thin alias of
        :meth:`from_base` (keywords ``scheduler``, ``torch_dtype``, ``variant``, ``vae``)."""
        if "brushnet" not in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if args:
            raise TypeError("from_pretrained(base, brushnet=...) takes keyword arguments only")
        return cls.from_base(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike,
        brushnet: BrushNetModel | str | os.PathLike,
        *,
        scheduler: str | SchedulerMixin = "unipc",
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        vae: str | os.PathLike | None = None,
    ) -> BrushNetInpaintPipeline:
        """A pipeline from a base model (diffusers folder or hub id) and a branch (model, folder or hub id).

        ``scheduler`` is a short name (see :data:`SCHEDULERS`), a diffusers scheduler class name, or a
        scheduler instance; names are built from the base's scheduler config. ``vae`` optionally replaces
        the base's VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix`` for SDXL in fp16, as the official example).
        """
        if isinstance(scheduler, str):
            _scheduler_class(scheduler)  # fail on a bad name before loading anything
        if not isinstance(brushnet, BrushNetModel):
            brushnet = load_brushnet(brushnet, torch_dtype=torch_dtype)
        parts = load_base_components(base, variant=variant, vae=vae, torch_dtype=torch_dtype)
        force_zeros = True
        if parts.path is not None and (parts.path / "model_index.json").is_file():
            index = json.loads((parts.path / "model_index.json").read_text())
            force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return cls(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            brushnet=brushnet,
            scheduler=make_scheduler(scheduler, parts.scheduler.config),
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=parts.tokenizer_2,
            force_zeros_for_empty_prompt=force_zeros,
        )

    # ---- latents ----------------------------------------------------------------------------------

    @contextmanager
    def _vae_precision(self):
        """Run the VAE in fp32 when it is fp16 and its config asks for it (``force_upcast``, SDXL's VAE)."""
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield self.vae.dtype
        finally:
            if upcast:
                self.vae.to(dtype)

    def _condition_latents(
        self, masked_rgb: np.ndarray, keep: np.ndarray, generator, copies: int = 1
    ) -> torch.Tensor:
        """``cat([VAE(masked image) * scaling_factor, keep mask at latent size], 1)``: copies x 5 x h x w,
        one VAE sample per copy."""
        device = self._execution_device
        pixels = torch.from_numpy(masked_rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        pixels = pixels.expand(copies, -1, -1, -1)
        with self._vae_precision() as vae_dtype:
            dist = self.vae.encode(pixels.to(device, vae_dtype)).latent_dist
            latents = dist.sample(generator) * self.vae.config.scaling_factor
        mask = torch.from_numpy(keep.astype(np.float32))[None, None].to(device).expand(copies, -1, -1, -1)
        # nearest resize to latent size, as the official pipeline (pixel-space for a `conv` ablation branch)
        return branch_condition(self.brushnet, latents.float(), pixels.to(device), mask)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        with self._vae_precision() as vae_dtype:
            images = self.vae.decode(
                latents.to(vae_dtype) / self.vae.config.scaling_factor, return_dict=False
            )[0]
        images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (images * 255).round().astype(np.uint8)

    # ---- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput,
        mask: ImageInput,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        brushnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        guess_mode: bool = False,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        blend: bool = True,
        blur_size: int = 21,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        masked_image_encoding: str = "once",
    ) -> BrushNetInpaintOutput | tuple:
        """Inpaint the white region of ``mask`` in ``image`` following ``prompt``.

        ``brushnet_conditioning_scale`` is a float or one value per branch residual (down, mid, up).
        ``height``/``width`` set the processing resolution (default: the image size rounded down to a
        multiple of 8); the output always has the input image's size. ``blend``/``blur_size`` control the
        blurred paste-back. ``original_size``, ``crops_coords_top_left``, ``target_size``: SDXL
        micro-conditioning (default: the processing size, (0, 0), the processing size).
        ``output_type``: "pil", "np" (uint8 N x H x W x 3) or "latent" (no decoding, no blending).
        ``masked_image_encoding``: "once" (one VAE sample of the masked image for the whole batch and both
        CFG halves) or "official" (one sample per image and CFG half, as the official pipelines encode the
        CFG-doubled batch).
        """
        if masked_image_encoding not in ("once", "official"):
            raise ValueError(
                f"masked_image_encoding must be 'once' or 'official', got {masked_image_encoding!r}"
            )
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        check_call_options(control_guidance_start, control_guidance_end, output_type)
        inputs = prepare_inpaint_inputs(image, mask, height, width, self.vae_scale_factor)
        rgb, inpaint, proc_hw = inputs.rgb, inputs.inpaint, inputs.size_hw
        keep, masked_rgb = inputs.keep, inputs.masked_rgb

        device = self._execution_device
        dtype = self.unet.dtype
        batch = len(prompts) * num_images_per_prompt
        cfg = guidance_scale > 1.0
        time_ids = None
        if self.is_sdxl:
            check_sdxl_unet_fits(self.unet, self.text_encoder_2)
            time_ids = sdxl_time_ids(
                torch.tensor([original_size or proc_hw]),
                torch.tensor([crops_coords_top_left]),
                tuple(target_size or proc_hw),
            )
        text = prompt_conditioning(
            CaptionTokenizers(self.tokenizer, self.tokenizer_2),
            self.text_encoder,
            self.text_encoder_2,
            prompts,
            negatives,
            guidance=cfg,
            zeros_for_empty_negative=self.config.force_zeros_for_empty_prompt,
            time_ids=time_ids,
            repeats=num_images_per_prompt,
            device=device,
            dtype=dtype,
        )
        embeds, added_cond = text.encoder_hidden_states, text.added_cond_kwargs

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        f = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, proc_hw[0] // f, proc_hw[1] // f)
        if latents is None:
            latents = torch.randn(
                shape, generator=generator, device=generator.device if generator else device
            )
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        # Drawn after the initial noise (the official pipeline samples the VAE from the global RNG).
        copies = 1 if masked_image_encoding == "once" else batch * (2 if cfg and not guess_mode else 1)
        cond = self._condition_latents(masked_rgb, keep, generator, copies).to(device, self.brushnet.dtype)
        cond = cond.expand(batch, -1, -1, -1) if copies == 1 else cond

        step_kwargs = {}
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            keep_i = guidance_keep(i, len(timesteps), control_guidance_start, control_guidance_end)
            scale = step_scale(brushnet_conditioning_scale, keep_i)
            if all_zero(scale):
                noise_pred = self.unet(
                    model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added_cond, return_dict=False
                )[0]
            else:
                noise_pred = predict_with_branch(
                    self.unet,
                    self.brushnet,
                    model_in,
                    t,
                    embeds,
                    cond,
                    added_cond,
                    scale=scale,
                    cfg=cfg,
                    guess_mode=guess_mode,
                )
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

        if output_type == "latent":
            images: Any = latents
        else:
            images = [resize_rgb(g, rgb.shape[:2]) for g in self._decode(latents)]
            if blend:
                images = [blurred_blend(rgb, g, inpaint, blur_size=blur_size) for g in images]
            images = np.stack(images) if output_type == "np" else [PIL.Image.fromarray(g) for g in images]
        self.maybe_free_model_hooks()
        return BrushNetInpaintOutput(images=images) if return_dict else (images,)
