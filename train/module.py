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
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from brushnet.injection import unet_forward_with_brushnet
from brushnet.loading import check_branch_matches_unet, load_base_components
from brushnet.model import BrushNetModel
from train.conditioning import text_conditioning
from train.optim import OptimizerName, ScheduleName, build_optimizer, build_scheduler
from train.precision import warn_if_emulated_bf16

log = logging.getLogger(__name__)

TRAINED_PREFIXES = ("brushnet.", "ema.")  # what a Lightning checkpoint stores of the model
_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "fp16": torch.float16}


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradients) became NaN/Inf and ``nan_policy="stop"``."""


def weight_dtype_for(precision: str | int | None) -> torch.dtype:
    """Dtype of the frozen models for a Lightning precision: bf16 for ``bf16-*``, fp16 for ``16-*``."""
    head = str(precision).split("-")[0]
    return _PRECISION_DTYPES.get(head, torch.float32)


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
            ``max_consecutive_skips``) or ``stop`` at once with an error. With gradient accumulation a
            non-finite micro-batch drops the whole step; under DDP/FSDP all ranks skip (or stop) together.
        seed: seeds the per-step generator (see the module docstring).
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
        nan_policy: Literal["skip", "stop"] = "skip",
        max_consecutive_skips: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if nan_policy not in ("skip", "stop"):
            raise ValueError(f"nan_policy must be 'skip' or 'stop', got {nan_policy!r}")
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
        if brushnet_model_name_or_path:
            from brushnet.loading import load_brushnet

            branch = load_brushnet(brushnet_model_name_or_path, torch_dtype=torch.float32)
            check_branch_matches_unet(branch, self.unet)
        else:
            branch = BrushNetModel.from_unet(self.unet)
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
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self._update_skipped = False
        self._window_done = True  # set after each optimizer step; see training_step
        self._non_finite_reason: str | None = None  # the first non-finite loss of this window
        self.strict_loading = (
            False  # checkpoints hold only the trained branch (+ EMA); see on_load_checkpoint
        )

    # ------------------------------------------------------------------ models
    def frozen_models(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

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
        wd = self.weight_dtype
        pixels = torch.cat([batch["pixel_values"], batch["conditioning_pixel_values"]]).to(wd)
        with torch.no_grad():
            latents_both = self.vae.encode(pixels).latent_dist.sample(generator)
            latents_both = latents_both.float() * self.vae.config.scaling_factor
        latents, masked_latents = latents_both.chunk(2)
        masks = F.interpolate(batch["masks"].float(), size=latents.shape[-2:])  # nearest (official)
        brushnet_cond = torch.cat([masked_latents, masks], dim=1)

        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.hparams.noise_offset:
            offset = torch.randn((bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device)
            noise = noise + self.hparams.noise_offset * offset
        num_t = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_t, (bsz,), generator=generator, device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        h, w = batch["pixel_values"].shape[-2:]
        cond = text_conditioning(
            batch, self.text_encoder, self.text_encoder_2, target_size=(int(h), int(w)), dtype=wd
        )
        if use_branch:
            down, mid, up = self.brushnet(
                noisy,
                timesteps,
                encoder_hidden_states=cond.encoder_hidden_states,
                brushnet_cond=brushnet_cond,
                added_cond_kwargs=cond.added_cond_kwargs,
                return_dict=False,
            )
            pred = unet_forward_with_brushnet(
                self.unet,
                noisy.to(wd),
                timesteps,
                cond.encoder_hidden_states,
                down_block_add_samples=down,
                mid_block_add_sample=mid,
                up_block_add_samples=up,
                added_cond_kwargs=cond.added_cond_kwargs,
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
        if self._window_done:  # the first micro-batch of an optimizer step (of an accumulation window)
            self._window_done = False
            self._update_skipped = False  # read by optimizer_step and lr_scheduler_step
            self._non_finite_reason = None
        loss = self.compute_loss(batch, self.step_generator(self._batch_counter()))
        bsz = batch["pixel_values"].shape[0]
        if not torch.isfinite(loss):
            keys = list(batch.get("keys", []))[:8]
            where = f"at step {self.global_step}" + (f" (batch keys {keys})" if keys else "")
            self._non_finite_reason = self._non_finite_reason or f"loss is {loss.item()} {where}"
            # The backward still runs: under DDP every rank must reach the gradient all-reduce. The whole
            # update is then dropped on every rank at once, in on_before_optimizer_step.
            return loss
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        if "num_bad" in batch:
            self.log("train/bad_samples_in_batch", batch["num_bad"].float(), reduce_fx="sum", batch_size=bsz)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the update of a window that saw a non-finite loss or gradient, on every rank or on none.

        Called once per optimizer step, after the gradients of all accumulated micro-batches are reduced
        across ranks. The gradients are checked on this rank's (local shard of the) parameters, and one
        scalar all-reduce makes the verdict the same on every rank (FSDP2 ranks hold different shards).
        Under ``16-mixed`` the GradScaler skips steps with inf/NaN gradients itself (an overflow is not an
        error there), so only a non-finite loss counts.
        """
        reason = self._non_finite_reason
        if reason is None and not str(self.trainer.precision).startswith("16"):
            grads = [_local_tensor(p.grad) for p in self.brushnet.parameters() if p.grad is not None]
            # one reduction and one host sync for all gradients (a NaN/Inf element makes its norm NaN/Inf)
            if grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
                reason = f"a gradient is NaN/Inf at step {self.global_step}"
        if self.trainer.world_size > 1:
            flag = torch.tensor(float(reason is not None), device=self.device)
            if float(self.trainer.strategy.reduce(flag, reduce_op="sum")) > 0 and reason is None:
                reason = f"a non-finite loss or gradient on another rank at step {self.global_step}"
        if reason is None:
            self.consecutive_skips = 0
            return
        for p in self.brushnet.parameters():
            p.grad = None  # the optimizer leaves parameters without a gradient unchanged
        self._skip_update(reason)

    def _skip_update(self, what: str) -> None:
        if self.hparams.nan_policy == "stop":
            raise NonFiniteLossError(
                f"{what}; stopping (nan_policy='stop'). No checkpoint was written from the non-finite state."
            )
        self._update_skipped = True
        self.consecutive_skips += 1
        self.skipped_steps += 1
        log.warning("%s: skipping this optimizer step (%d in a row)", what, self.consecutive_skips)
        if self.consecutive_skips > self.hparams.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self.consecutive_skips} consecutive non-finite steps (last: {what}), more than "
                f"max_consecutive_skips={self.hparams.max_consecutive_skips}: stopping"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update.

        Lightning calls this once per optimizer step (after the last accumulated micro-batch), inside the
        training step, so the EMA of step k is in place before any callback's ``on_train_batch_end`` (the
        checkpoint of step k). A skipped update (a non-finite loss or gradient in any micro-batch of the
        window, see ``on_before_optimizer_step``, or inf/NaN gradients found by the ``16-mixed`` GradScaler)
        leaves the branch unchanged, and the EMA and the LR schedule too.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        super().optimizer_step(*args, **kwargs)
        if scale is not None and scaler.get_scale() < scale:  # GradScaler.update() backs off only on a skip
            self._update_skipped = True
        if self.ema is not None and not self._update_skipped:
            self.update_ema()
        self._window_done = True

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """The LR schedule counts real updates: a skipped optimizer step does not advance it."""
        if not self._update_skipped:
            super().lr_scheduler_step(scheduler, metric)

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = self.hparams.ema_decay
        ema = [p for p in self.ema.parameters()]
        live = [p.detach() for p in self.brushnet.parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - decay)

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
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------- checkpoints
    def branch_is_finite(self) -> bool:
        models = [self.brushnet] + ([self.ema] if self.ema is not None else [])
        return all(bool(torch.isfinite(p).all()) for m in models for p in m.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained weights: the frozen base is reloaded from its folder/id on resume."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(TRAINED_PREFIXES)}
        checkpoint["brushnet_train"] = {"skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        expected = {f"brushnet.{k}" for k in self.brushnet.state_dict()}
        if self.ema is not None:
            expected |= {f"ema.{k}" for k in self.ema.state_dict()}
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} trained weights (e.g. {missing[:3]}): was it written by "
                "another model configuration (EMA on/off, another base)?"
            )
        info = checkpoint.get("brushnet_train", {})
        self.skipped_steps = int(info.get("skipped_steps", 0))
