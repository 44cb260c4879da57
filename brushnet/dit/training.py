"""The flow-matching training objective of a DiT BrushNet branch (SD3 / Flux), as a library function.

``x_t = (1 - sigma) x_0 + sigma noise``; the base + branch predict the velocity, the target is
``noise - x_0`` (rectified flow, as diffusers' ``train_dreambooth_sd3.py`` / ``train_dreambooth_flux.py``
without output preconditioning). Timesteps follow the SD3 paper's options through diffusers'
``compute_density_for_timestep_sampling`` (``logit_normal``, ``mode``, else uniform) and the loss weighting
through ``compute_loss_weighting_for_sd3`` (``sigma_sqrt``, ``cosmap``, else 1). The sampled ``u`` is then
shifted like the base's inference schedule (its ``scheduler_config.json``): the static ``shift`` (SD3:
3.0), or with ``use_dynamic_shifting`` (Flux) the resolution-dependent ``mu`` of ``FluxPipeline``.
(diffusers' Flux script samples the *unshifted* table there; we train on the schedule we sample with.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from brushnet.dit.latents import latent_keep_mask, vae_encode
from brushnet.dit.text import DiTText, encode_tokens

WeightingScheme = Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"]


def shift_sigmas(u: torch.Tensor, scheduler_config: Any, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``u`` in (0, 1) mapped by the scheduler's shift (``FlowMatchEulerDiscreteScheduler`` conventions)."""
    if scheduler_config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(
            (latent_hw[0] // 2) * (latent_hw[1] // 2),
            scheduler_config.get("base_image_seq_len", 256),
            scheduler_config.get("max_image_seq_len", 4096),
            scheduler_config.get("base_shift", 0.5),
            scheduler_config.get("max_shift", 1.15),
        )
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the scheduler's exponential time shift
    shift = scheduler_config.get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


@dataclass
class FlowMatchingObjective:
    """``weighting_scheme`` picks both the timestep density and the loss weight (diffusers' SD3 scripts).

    ``guidance``: the guidance-embedding value a guidance-distilled base (Flux dev) gets during training
    (``train_dreambooth_flux.py``'s default 3.5).
    """

    weighting_scheme: WeightingScheme = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float = 3.5

    def sample_sigmas(
        self, scheduler_config: Any, batch: int, latent_hw: tuple[int, int], device, generator=None
    ) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme=self.weighting_scheme,
            batch_size=batch,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            device=device,
            generator=generator,
        )
        # keep sigma inside the training table's range [1/1000, 1] (FlowMatchEulerDiscreteScheduler)
        u = u.clamp(1e-3, 1.0)
        return shift_sigmas(u, scheduler_config, latent_hw)

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)

    def loss(
        self,
        family,
        transformer,
        branch,
        latents: torch.Tensor,
        masked_latents: torch.Tensor,
        keep: torch.Tensor,
        text: DiTText,
        scheduler_config: Any,
        generator: torch.Generator | None = None,
        use_branch: bool = True,
    ) -> torch.Tensor:
        """The weighted flow-matching MSE of one batch (``use_branch=False``: the frozen base alone)."""
        b, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device)
        sigmas = self.sample_sigmas(scheduler_config, b, latents.shape[-2:], device, generator)
        s = sigmas.view(b, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        residuals = None
        if use_branch:
            residuals = family.residuals(branch, noisy, masked_latents, keep, sigmas, text, self.guidance)
        pred = family.predict(transformer, noisy, sigmas, text, residuals, self.guidance)
        per_sample = F.mse_loss(pred.float(), (noise - latents).float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.weights(sigmas).float()).mean()


@torch.no_grad()
def encode_batch(
    vae,
    pixel_values: torch.Tensor,
    conditioning_pixel_values: torch.Tensor,
    masks: torch.Tensor,
    generator=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents, masked latents, keep mask at latent size)`` from a training batch (one VAE call for both).

    ``pixel_values`` / ``conditioning_pixel_values`` (the masked image, hole -1) in [-1, 1]; ``masks``:
    ``B x 1 x H x W``, 1 = keep (the UNet trainer's batch layout).
    """
    both = vae_encode(vae, torch.cat([pixel_values, conditioning_pixel_values]), generator).float()
    latents, masked = both.chunk(2)
    return latents, masked, latent_keep_mask(masks, latents.shape[-2:])


def batch_loss(
    family,
    components: Any,
    branch,
    batch: dict[str, torch.Tensor],
    objective: FlowMatchingObjective,
    generator: torch.Generator | None = None,
    use_branch: bool = True,
) -> torch.Tensor:
    """The loss of one trainer batch: ``pixel_values``, ``conditioning_pixel_values`` (float, [-1, 1]), ``masks``
    (B x 1 x H x W, 1 = keep) and the :class:`~brushnet.dit.text.DiTTokenizers` ids (``input_ids``, ...).

    ``components``: the base's parts by pipeline name (:func:`brushnet.dit.family.load_dit_base`).
    """
    vae, transformer = components["vae"], components["transformer"]
    latents, masked, keep = encode_batch(
        vae, batch["pixel_values"], batch["conditioning_pixel_values"], batch["masks"], generator
    )
    tokens = {k: v for k, v in batch.items() if k.startswith("input_ids")}
    text = encode_tokens(family.name, components, tokens).to(device=latents.device)
    config = components["scheduler"].config
    return objective.loss(
        family, transformer, branch, latents, masked, keep, text, config, generator, use_branch
    )
