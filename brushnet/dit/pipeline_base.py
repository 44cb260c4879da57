"""The inpainting loop shared by the SD3 and Flux BrushNet pipelines (flow-matching Euler).

Same user-facing behaviour as :class:`brushnet.pipeline.BrushNetInpaintPipeline`: the mask is white =
inpaint; the hole is blacked out in the image, the masked image is VAE-encoded (SD3 / Flux scaling and
shift) and given to the branch with the keep mask (1 = keep) at latent size; ``control_guidance_start/end``
switch the branch off outside a fraction of the steps (a step with scale 0 runs the plain base); the output
has the input's size and is pasted back with blurred blending. Each step is
``x <- x + (sigma_next - sigma) v`` (``FlowMatchEulerDiscreteScheduler.step``) with the velocity ``v`` of
the base + branch through the family interface (:mod:`brushnet.dit.family`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from brushnet.dit.latents import latent_keep_mask, vae_decode, vae_encode
from brushnet.dit.loading import check_branch_matches_transformer
from brushnet.dit.text import DiTText
from brushnet.guidance import all_zero, guidance_keep, step_scale
from brushnet.images import ImageInput, check_call_options, prepare_inpaint_inputs, prompt_lists, resize_rgb
from brushnet.masks import blurred_blend
from brushnet.pipeline import BrushNetInpaintOutput


class DiTInpaintPipeline(DiffusionPipeline):
    """Base class: subclasses set ``family`` and register their components."""

    family: ClassVar[Any]
    uses_cfg: ClassVar[bool]  # SD3: classifier-free guidance; Flux dev: the guidance embedding instead

    def _check(self) -> None:
        check_branch_matches_transformer(self.brushnet, self.transformer)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Processing sides are multiples of this: the VAE factor times the 2x2 patch (SD3) / packing (Flux)."""
        return self.vae_scale_factor * 2

    def _set_timesteps(self, num_steps: int, latent_hw: tuple[int, int], device) -> torch.Tensor:
        cfg = self.scheduler.config
        kw: dict[str, Any] = {}
        if cfg.get("use_dynamic_shifting"):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)
            kw["mu"] = calculate_shift(
                seq_len,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
            kw["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)  # FluxPipeline's default schedule
        self.scheduler.set_timesteps(num_steps if "sigmas" not in kw else None, device=device, **kw)
        return self.scheduler.timesteps

    def _encode_text(self, prompts: list[str], negatives: list[str], cfg: bool, per_prompt: int) -> DiTText:
        """Prompt conditioning repeated ``per_prompt`` times, with the negative half first under CFG."""
        text = self.family.encode_text(self.components, prompts).repeat_interleave(per_prompt)
        if cfg:
            negative = self.family.encode_text(self.components, negatives).repeat_interleave(per_prompt)
            text = DiTText.cat([negative, text])
        return text.to(device=self._execution_device, dtype=self.transformer.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput,
        mask: ImageInput,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        brushnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        blend: bool = True,
        blur_size: int = 21,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> BrushNetInpaintOutput | tuple:
        """Inpaint the white region of ``mask`` in ``image`` following ``prompt``.

        ``guidance_scale``: classifier-free guidance for SD3 (default 7.0, off at <= 1), the embedded
        guidance for Flux dev (default 3.5; ignored by schnell). ``brushnet_conditioning_scale``: a float
        or one value per base block. ``output_type``: "pil", "np" (uint8 N x H x W x 3) or "latent".
        """
        if guidance_scale is None:
            guidance_scale = 7.0 if self.uses_cfg else 3.5
        if negative_prompt is not None and not self.uses_cfg:
            raise ValueError(
                f"{type(self).__name__} has no classifier-free guidance (Flux takes guidance_scale as an "
                "embedding), so negative_prompt would be ignored: leave it out"
            )
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        negatives = negatives or [""] * len(prompts)
        check_call_options(control_guidance_start, control_guidance_end, output_type)
        inputs = prepare_inpaint_inputs(image, mask, height, width, self.size_multiple)
        rgb, inpaint, proc_hw = inputs.rgb, inputs.inpaint, inputs.size_hw
        keep_px, masked_rgb = inputs.keep, inputs.masked_rgb

        device, dtype = self._execution_device, self.transformer.dtype
        batch = len(prompts) * num_images_per_prompt
        cfg = self.uses_cfg and guidance_scale > 1.0
        text = self._encode_text(prompts, negatives, cfg, num_images_per_prompt)

        latent_hw = (proc_hw[0] // self.vae_scale_factor, proc_hw[1] // self.vae_scale_factor)
        shape = (batch, self.vae.config.latent_channels, *latent_hw)
        if latents is None:
            latents = torch.randn(
                shape, generator=generator, device=generator.device if generator else device
            )
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32)
        pixels = torch.from_numpy(masked_rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        masked_latents = vae_encode(self.vae, pixels.to(device), generator).float().expand(batch, -1, -1, -1)
        keep = latent_keep_mask(torch.from_numpy(keep_px)[None, None].to(device), latent_hw).expand(
            batch, -1, -1, -1
        )
        if cfg:
            masked_latents, keep = torch.cat([masked_latents] * 2), torch.cat([keep] * 2)

        timesteps = self._set_timesteps(num_inference_steps, latent_hw, device)
        for i, t in enumerate(self.progress_bar(timesteps)):
            sigma = self.scheduler.sigmas[i].to(device)
            model_in = torch.cat([latents] * 2) if cfg else latents
            scale = step_scale(
                brushnet_conditioning_scale,
                guidance_keep(i, len(timesteps), control_guidance_start, control_guidance_end),
            )
            residuals = None
            if not all_zero(scale):
                residuals = self.family.residuals(
                    self.brushnet, model_in, masked_latents, keep, sigma, text, guidance_scale, scale
                )
            v = self.family.predict(
                self.transformer, model_in, sigma, text, residuals, guidance_scale
            ).float()
            if cfg:
                uncond, cond = v.chunk(2)
                v = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        if output_type == "latent":
            images: Any = latents
        else:
            decoded = vae_decode(self.vae, latents.to(dtype)).float()
            decoded = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
            images = [resize_rgb(g, rgb.shape[:2]) for g in decoded.astype(np.uint8)]
            if blend:
                images = [blurred_blend(rgb, g, inpaint, blur_size=blur_size) for g in images]
            images = np.stack(images) if output_type == "np" else [PIL.Image.fromarray(g) for g in images]
        self.maybe_free_model_hooks()
        return BrushNetInpaintOutput(images=images) if return_dict else (images,)
