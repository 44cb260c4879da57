"""The UNet family (SD 1.5 / SD 2.x / SDXL) of :class:`train.module.BrushNetTrainingModule`.

One step (official ``examples/brushnet/train_brushnet.py``, plus options the official script lacks):
image and masked image through the frozen VAE in one batched call, the keep-mask resized to latent size
(nearest, ``F.interpolate``'s default as in the official script), noise + uniform timesteps, text
conditioning, branch -> residuals -> frozen UNet -> MSE against epsilon or v (the base scheduler's
``prediction_type``), optionally min-SNR-gamma weighted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from brushnet.conditioning import check_sdxl_unet_fits, sdxl_time_ids, text_conditioning
from brushnet.guidance import predict_with_branch
from brushnet.injection import branch_condition
from brushnet.loading import check_branch_matches_unet, load_base_components
from brushnet.model import BrushNetModel
from brushnet.single_branch import inpainting_unet_from, single_branch_input
from train.data.transforms import normalize_batch

if TYPE_CHECKING:
    from brushnet.pipeline import BrushNetInpaintPipeline

# Options of the other families, at the values that mean "not used" (a set one is refused).
DIT_ONLY = {
    "branch_num_layers": None,
    "branch_text": False,
    "with_t5": True,
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "flux_guidance": 3.5,
}


class UNetParts:
    """A UNet base's frozen parts (set on the module as ``vae``, ``unet``, ``text_encoder[_2]``), branch, loss."""

    name = "unet"
    denoiser = "unet"
    encoders = ("vae", "text_encoder", "text_encoder_2")

    def __init__(self, base: str, hp: Any) -> None:
        parts = load_base_components(base, variant=hp.variant, vae=hp.vae, revision=hp.revision)
        self.attributes = {
            "vae": parts.vae,
            "unet": parts.unet,
            "text_encoder": parts.text_encoder,
            "text_encoder_2": parts.text_encoder_2,
            "tokenizer": parts.tokenizer,
            "tokenizer_2": parts.tokenizer_2,
            "noise_scheduler": parts.scheduler,
        }
        if parts.text_encoder_2 is not None:
            check_sdxl_unet_fits(parts.unet, parts.text_encoder_2)
        self.prediction_type = parts.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unsupported scheduler prediction_type {self.prediction_type!r} in "
                f"{base}/scheduler (expected 'epsilon' or 'v_prediction')"
            )

    @staticmethod
    def build_branch(m: Any) -> nn.Module:
        """The branch to train: a loaded one, a 9-channel UNet (``single_branch``) or a clone of the UNet."""
        hp = m.hparams
        if hp.brushnet_model_name_or_path:
            from brushnet.loading import load_brushnet

            branch = load_brushnet(hp.brushnet_model_name_or_path, torch_dtype=torch.float32)
            check_branch_matches_unet(branch, m.unet)
            return branch
        if hp.single_branch:
            return inpainting_unet_from(m.unet)
        return BrushNetModel.from_unet(
            m.unet,
            injection=hp.injection,
            condition_encoder=hp.condition_encoder,
            branch_cross_attention=hp.branch_cross_attention,
            vae_scale_factor=2 ** (len(m.vae.config.block_out_channels) - 1),
        )

    def loss(self, m: Any, batch: dict, generator: torch.Generator, use_branch: bool = True) -> torch.Tensor:
        """The loss of one batch for module ``m`` (``use_branch=False``: the frozen UNet alone)."""
        hp, wd, branch = m.hparams, m.weight_dtype, m.brushnet
        batch = normalize_batch(batch)  # uint8 loader batches -> float model inputs, on the device
        pixels = torch.cat([batch["pixel_values"], batch["conditioning_pixel_values"]]).to(wd)
        with torch.no_grad():
            latents_both = m.vae.encode(pixels).latent_dist.sample(generator)
            latents_both = latents_both.float() * m.vae.config.scaling_factor
        latents, masked_latents = latents_both.chunk(2)
        # [masked latents, keep mask resized to latent size (nearest, official)]; pixel-space for `conv`
        brushnet_cond = branch_condition(
            branch, masked_latents, pixels.chunk(2)[1].float(), batch["masks"].float()
        )

        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if hp.noise_offset:
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device)
            noise = noise + hp.noise_offset * offset
        num_t = m.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_t, (bsz,), generator=generator, device=latents.device).long()
        noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)

        h, w = batch["pixel_values"].shape[-2:]
        time_ids = None
        if m.text_encoder_2 is not None:  # SDXL
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], (int(h), int(w)))
        cond = text_conditioning(m.text_encoder, batch, m.text_encoder_2, time_ids=time_ids, dtype=wd)
        if use_branch and hp.single_branch:
            pred = branch(
                single_branch_input(noisy, masked_latents, batch["masks"]),
                timesteps,
                encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs,
                return_dict=False,
            )[0]
        elif use_branch:
            pred = predict_with_branch(
                m.unet,
                branch,
                noisy,
                timesteps,
                cond.encoder_hidden_states,
                brushnet_cond,
                cond.added_cond_kwargs,
            )
        else:
            pred = m.unet(
                noisy.to(wd),
                timesteps,
                encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs,
                return_dict=False,
            )[0]
        target = (
            noise
            if self.prediction_type == "epsilon"
            else m.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.snr_weights(m, timesteps)).mean()

    def snr_weights(self, m: Any, timesteps: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma weights (Hang et al. 2023; diffusers' train_text_to_image); ones when off."""
        gamma = m.hparams.min_snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        ac = m.noise_scheduler.alphas_cumprod.to(timesteps.device).float()[timesteps]
        snr = ac / (1.0 - ac)
        weights = torch.clamp(snr, max=gamma)
        return weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1.0)

    @staticmethod
    def pipeline(m: Any, branch: nn.Module, scheduler: str | None) -> BrushNetInpaintPipeline:
        """A :class:`~brushnet.pipeline.BrushNetInpaintPipeline` sharing ``m``'s models (default ``unipc``)."""
        from brushnet.pipeline import BrushNetInpaintPipeline, make_scheduler

        if m.hparams.get("single_branch"):
            raise ValueError(
                "model.single_branch trains a 9-channel UNet, not a BrushNet branch: run its export with "
                "brushnet.single_branch.inpaint_single_branch (validation grids do not apply)"
            )
        return BrushNetInpaintPipeline(
            vae=m.vae,
            text_encoder=m.text_encoder,
            tokenizer=m.tokenizer,
            unet=m.unet,
            brushnet=branch,
            scheduler=make_scheduler(scheduler or "unipc", m.noise_scheduler.config),
            text_encoder_2=m.text_encoder_2,
            tokenizer_2=m.tokenizer_2,
        )
