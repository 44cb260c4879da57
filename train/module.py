"""``BrushNetTrainingModule``: the LightningModule that trains a BrushNet branch on a frozen base model.

One step (official ``examples/brushnet/train_brushnet.py``, plus options the official script lacks):
image and masked image through the frozen VAE in one batched call, the keep-mask resized to latent size
(nearest, ``F.interpolate``'s default as in the official script), noise + uniform timesteps, text
conditioning, branch -> residuals -> frozen UNet -> MSE against epsilon or v (the base scheduler's
``prediction_type``), optionally min-SNR-gamma weighted.

Randomness of a step (VAE sampling, noise, timesteps) comes from a generator seeded by ``(seed, rank,
micro-batch counter)``, so a resumed run draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from brushnet.conditioning import check_sdxl_unet_fits, sdxl_time_ids, text_conditioning
from brushnet.guidance import predict_with_branch
from brushnet.injection import branch_condition
from brushnet.loading import check_branch_matches_unet, load_base_components
from brushnet.model import BrushNetModel
from brushnet.single_branch import inpainting_unet_from, single_branch_input
from train.checkpoint_state import check_trained_weights, keep_trained_weights
from train.data.transforms import normalize_batch
from train.nonfinite import NanPolicy, NonFiniteLossError, NonFiniteSteps
from train.optim import OptimizerName, ScheduleName, build_optimizer, build_scheduler
from train.precision import warn_if_emulated_bf16, weight_dtype_for

if TYPE_CHECKING:
    from brushnet.pipeline import BrushNetInpaintPipeline

__all__ = ["BrushNetTrainingModule", "NonFiniteLossError", "weight_dtype_for"]

log = logging.getLogger(__name__)

Injection = Literal["full", "half", "controlnet"]
ConditionEncoder = Literal["vae", "conv"]


class BrushNetTrainingModule(L.LightningModule):
    """Train a BrushNet branch on a frozen SD 1.5 / SD 2.x / SDXL base.

    Args:
        pretrained_model_name_or_path: base model, diffusers folder or hub id.
        variant / vae / revision: as :func:`brushnet.loading.load_base_components` (``vae``: e.g. SDXL's
            fp16-fix VAE).
        brushnet_model_name_or_path: an existing branch folder/id to fine-tune (official releases load);
            ``None`` clones a new branch from the UNet (``BrushNetModel.from_unet``).
        optimizer: ``adamw``, ``adamw8bit`` (official) or ``paged_adamw8bit``.
        lr_scheduler: ``constant`` (official), ``cosine`` or ``linear`` after ``lr_warmup_steps``; the decay
            ends at ``trainer.max_steps``.
        gradient_checkpointing: recompute activations of the branch *and* the frozen UNet in backward.
        min_snr_gamma: min-SNR-gamma loss weighting (None: plain MSE, the official loss).
        noise_offset: offset noise strength (0: off, official).
        ema_decay: keep an EMA of the branch (saved in checkpoints, exported next to the branch); None: off.
        nan_policy: on a NaN/Inf loss or gradient, ``skip`` the optimizer step (and stop after
            ``max_consecutive_skips``) or ``stop`` at once with an error; the whole policy is
            :class:`train.nonfinite.NonFiniteSteps`.
        seed: seeds the per-step generator (see the module docstring).
        injection / condition_encoder / branch_cross_attention: the paper's ablations for a new branch
            (:class:`brushnet.model.BrushNetModel`; defaults = BrushNet); a loaded branch keeps its own.
        single_branch: the "dual vs single branch" baseline (:mod:`brushnet.single_branch`): no branch; a
            9-channel copy of the UNet is fine-tuned instead (held, trained and exported as ``brushnet``).
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        variant: str | None = None,
        vae: str | None = None,
        revision: str | None = None,
        brushnet_model_name_or_path: str | None = None,
        optimizer: OptimizerName = "adamw8bit",
        learning_rate: float = 1e-5,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_weight_decay: float = 1e-2,
        adam_epsilon: float = 1e-8,
        lr_scheduler: ScheduleName = "constant",
        lr_warmup_steps: int = 0,
        lr_min_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        ema_decay: float | None = None,
        nan_policy: NanPolicy = "skip",
        max_consecutive_skips: int = 20,
        seed: int = 0,
        injection: Injection = "full",
        condition_encoder: ConditionEncoder = "vae",
        branch_cross_attention: bool = False,
        single_branch: bool = False,
    ) -> None:
        super().__init__()
        self.nonfinite = NonFiniteSteps(nan_policy, max_consecutive_skips)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.save_hyperparameters()
        parts = load_base_components(
            pretrained_model_name_or_path, variant=variant, vae=vae, revision=revision
        )
        self.vae, self.unet = parts.vae, parts.unet
        self.text_encoder, self.tokenizer = parts.text_encoder, parts.tokenizer
        self.text_encoder_2, self.tokenizer_2 = parts.text_encoder_2, parts.tokenizer_2
        self.noise_scheduler = parts.scheduler
        for frozen in self.frozen_models():
            frozen.requires_grad_(False)
        if self.text_encoder_2 is not None:
            check_sdxl_unet_fits(self.unet, self.text_encoder_2)
        if brushnet_model_name_or_path:
            from brushnet.loading import load_brushnet

            branch = load_brushnet(brushnet_model_name_or_path, torch_dtype=torch.float32)
            check_branch_matches_unet(branch, self.unet)
        elif single_branch:
            branch = inpainting_unet_from(self.unet)
        else:
            branch = BrushNetModel.from_unet(
                self.unet,
                injection=injection,
                condition_encoder=condition_encoder,
                branch_cross_attention=branch_cross_attention,
                vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1),
            )
        self.brushnet = branch.float().train()  # fp32 master weights whatever the precision
        self.ema: BrushNetModel | None = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(self.brushnet).requires_grad_(False).eval()
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unsupported scheduler prediction_type {self.prediction_type!r} in "
                f"{pretrained_model_name_or_path}/scheduler (expected 'epsilon' or 'v_prediction')"
            )
        self.register_buffer(
            "alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False
        )
        self.weight_dtype = torch.float32
        self.strict_loading = False  # checkpoints hold only the branch (+ EMA); see on_load_checkpoint

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps dropped for a non-finite loss or gradient (see :class:`NonFiniteSteps`)."""
        return self.nonfinite.skipped_steps

    # ------------------------------------------------------------------ models
    def frozen_models(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def inference_pipeline(self, use_ema: bool = True, scheduler: str = "unipc") -> BrushNetInpaintPipeline:
        """A :class:`~brushnet.pipeline.BrushNetInpaintPipeline` sharing this module's models (no copies).

        ``use_ema``: the EMA branch when the module keeps one, else the live branch. ``scheduler``: a
        short name or diffusers class name, built from the base's scheduler config.
        """
        from brushnet.pipeline import BrushNetInpaintPipeline, make_scheduler

        if self.hparams.get("single_branch"):
            raise ValueError(
                "model.single_branch trains a 9-channel UNet, not a BrushNet branch: run its export with "
                "brushnet.single_branch.inpaint_single_branch (validation grids do not apply)"
            )
        pipe = BrushNetInpaintPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            brushnet=self.ema if use_ema and self.ema is not None else self.brushnet,
            scheduler=make_scheduler(scheduler, self.noise_scheduler.config),
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def setup(self, stage: str) -> None:
        self.weight_dtype = weight_dtype_for(self.trainer.precision if self._trainer is not None else None)
        if self._trainer is not None:
            warn_if_emulated_bf16(self.trainer.precision, self.trainer.strategy.root_device)
        for frozen in self.frozen_models():
            frozen.to(dtype=self.weight_dtype)
        if self.hparams.gradient_checkpointing:
            self.brushnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()

    def configure_model(self) -> None:
        from train.fsdp import FSDP2Strategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy):
            self.trainer.strategy.shard(self)

    def train(self, mode: bool = True) -> BrushNetTrainingModule:
        """The branch and the UNet follow ``mode``; VAE and text encoders stay in eval mode.

        The frozen UNet is put in train mode so that every gradient-checkpointing check of diffusers
        blocks (some versions test ``self.training``) fires; its dropouts are kept in eval mode, so the
        UNet computes exactly what it computes in eval mode (SD UNets have dropout 0 anyway).
        """
        super().train(mode)
        for m in (self.vae, self.text_encoder, self.text_encoder_2):
            if m is not None:
                m.eval()
        for m in self.unet.modules():
            if isinstance(m, nn.Dropout):
                m.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    def on_train_start(self) -> None:
        self.train()  # Lightning keeps modules' modes; apply the rules of train() above

    # -------------------------------------------------------------------- step
    def step_generator(self, batch_counter: int) -> torch.Generator:
        seed = (self.hparams.seed * 1_000_003 + self.global_rank) * 1_000_000_007 + batch_counter
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    def _batch_counter(self) -> int:
        if self._trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def compute_loss(self, batch: dict, generator: torch.Generator, use_branch: bool = True) -> torch.Tensor:
        """The training loss of one batch (``use_branch=False``: the frozen UNet alone, for comparisons)."""
        batch = normalize_batch(batch)  # uint8 loader batches -> float model inputs, on the device
        wd = self.weight_dtype
        pixels = torch.cat([batch["pixel_values"], batch["conditioning_pixel_values"]]).to(wd)
        with torch.no_grad():
            latents_both = self.vae.encode(pixels).latent_dist.sample(generator)
            latents_both = latents_both.float() * self.vae.config.scaling_factor
        latents, masked_latents = latents_both.chunk(2)
        # [masked latents, keep mask resized to latent size (nearest, official)]; pixel-space for `conv`
        brushnet_cond = branch_condition(
            self.brushnet, masked_latents, pixels.chunk(2)[1].float(), batch["masks"].float()
        )

        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.hparams.noise_offset:
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device)
            noise = noise + self.hparams.noise_offset * offset
        num_t = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_t, (bsz,), generator=generator, device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        h, w = batch["pixel_values"].shape[-2:]
        time_ids = None
        if self.is_sdxl:
            time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], (int(h), int(w)))
        cond = text_conditioning(self.text_encoder, batch, self.text_encoder_2, time_ids=time_ids, dtype=wd)
        if use_branch and self.hparams.single_branch:
            pred = self.brushnet(
                single_branch_input(noisy, masked_latents, batch["masks"]),
                timesteps,
                encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs,
                return_dict=False,
            )[0]
        elif use_branch:
            pred = predict_with_branch(
                self.unet,
                self.brushnet,
                noisy,
                timesteps,
                cond.encoder_hidden_states,
                brushnet_cond,
                cond.added_cond_kwargs,
            )
        else:
            pred = self.unet(
                noisy.to(wd),
                timesteps,
                encoder_hidden_states=cond.encoder_hidden_states,
                added_cond_kwargs=cond.added_cond_kwargs,
                return_dict=False,
            )[0]
        target = (
            noise
            if self.prediction_type == "epsilon"
            else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * self.snr_weights(timesteps)).mean()

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma weights (Hang et al. 2023; diffusers' train_text_to_image); ones when off."""
        gamma = self.hparams.min_snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        ac = self.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = ac / (1.0 - ac)
        weights = torch.clamp(snr, max=gamma)
        return weights / snr if self.prediction_type == "epsilon" else weights / (snr + 1.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.nonfinite.start_micro_batch()
        loss = self.compute_loss(batch, self.step_generator(self._batch_counter()))
        keys = list(batch.get("keys", []))[:8]
        where = f"at step {self.global_step}" + (f" (batch keys {keys})" if keys else "")
        if not self.nonfinite.loss_is_finite(loss, where):
            return loss  # the backward still runs (every rank reaches the all-reduce); the update is dropped
        bsz = batch["pixel_values"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        if "num_bad" in batch:
            self.log("train/bad_samples_in_batch", batch["num_bad"].float(), reduce_fx="sum", batch_size=bsz)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after the accumulated gradients are reduced: keep or drop the update."""
        self.nonfinite.check_update(
            self.brushnet.parameters(),
            self.global_step,
            check_gradients=not str(self.trainer.precision).startswith("16"),
            reduce=self.trainer.strategy.reduce if self.trainer.world_size > 1 else None,
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update.

        Lightning calls this once per optimizer step (after the last accumulated micro-batch), inside the
        training step, so the EMA of step k is in place before any callback's ``on_train_batch_end`` (the
        checkpoint of step k). A dropped update (:class:`NonFiniteSteps`, or inf/NaN gradients found by the
        ``16-mixed`` GradScaler) leaves the branch unchanged, and the EMA and the LR schedule too.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        super().optimizer_step(*args, **kwargs)
        # GradScaler.update() backs the scale off only on a skipped step
        self.nonfinite.finish_update(scaler_skipped=scale is not None and scaler.get_scale() < scale)
        if self.ema is not None and not self.nonfinite.update_skipped:
            self.update_ema()

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """The LR schedule counts real updates: a skipped optimizer step does not advance it."""
        if not self.nonfinite.update_skipped:
            super().lr_scheduler_step(scheduler, metric)

    @torch.no_grad()
    def update_ema(self) -> None:
        live = [p.detach() for p in self.brushnet.parameters()]
        torch._foreach_lerp_(list(self.ema.parameters()), live, 1.0 - self.hparams.ema_decay)

    # --------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        params = [p for p in self.brushnet.parameters() if p.requires_grad]
        optimizer = build_optimizer(
            params,
            hp.optimizer,
            lr=hp.learning_rate,
            betas=(hp.adam_beta1, hp.adam_beta2),
            weight_decay=hp.adam_weight_decay,
            eps=hp.adam_epsilon,
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        scheduler = build_scheduler(optimizer, hp.lr_scheduler, hp.lr_warmup_steps, total, hp.lr_min_ratio)
        # "name": the metric Lightning's LearningRateMonitor logs
        schedule = {"scheduler": scheduler, "interval": "step", "name": "train/lr"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # -------------------------------------------------------------- checkpoints
    def branch_is_finite(self) -> bool:
        models = [self.brushnet] + ([self.ema] if self.ema is not None else [])
        return all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trained_weights(checkpoint, self.nonfinite.skipped_steps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.skipped_steps = check_trained_weights(checkpoint, self.brushnet, self.ema)
