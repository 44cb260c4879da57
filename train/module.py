"""``BrushNetTrainingModule``: the LightningModule that trains a BrushNet branch on a frozen base model.

The base folder's family is picked once, at construction (:func:`train.families.load_family`): the UNet
family (SD 1.5 / 2.x / SDXL, :mod:`train.family_unet`: epsilon / v MSE) or a DiT family (SD3 / Flux,
:mod:`train.family_dit`: flow matching). The family holds the frozen models and computes the loss and the
inference pipeline; this module holds the branch, the EMA, the optimizer and the step bookkeeping.

Randomness of a step (VAE sampling, noise, timesteps) comes from a generator seeded by ``(seed, rank,
micro-batch counter)``, so a resumed run draws exactly what an uninterrupted run draws.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from brushnet.dit.training import WeightingScheme
from train.checkpoint_state import check_trained_weights, keep_trained_weights
from train.data.transforms import normalize_batch
from train.families import FamilyParts, load_family
from train.nonfinite import NanPolicy, NonFiniteLossError, NonFiniteSteps
from train.optim import OptimizerName, ScheduleName, build_optimizer, build_scheduler
from train.precision import warn_if_emulated_bf16, weight_dtype_for

__all__ = ["BrushNetTrainingModule", "NonFiniteLossError", "weight_dtype_for"]

log = logging.getLogger(__name__)

Injection = Literal["full", "half", "controlnet"]
ConditionEncoder = Literal["vae", "conv"]


class BrushNetTrainingModule(L.LightningModule):
    """Train a BrushNet branch on a frozen SD 1.5 / SD 2.x / SDXL, SD3 / SD3.5 or Flux.1 base.

    Args:
        pretrained_model_name_or_path: base model, diffusers folder or hub id.
        variant / vae / revision: as :func:`brushnet.loading.load_base_components` (``vae``: e.g. SDXL's
            fp16-fix VAE).
        brushnet_model_name_or_path: an existing branch folder/id to fine-tune (official releases load);
            ``None`` clones a new branch from the UNet (``BrushNetModel.from_unet``) or builds one from the
            DiT transformer (``from_transformer``).
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
        branch_num_layers / branch_text (DiT): the new branch's depth (None: the family's default) and
            whether its blocks keep the joint text stream.
        weighting_scheme / logit_mean / logit_std / mode_scale (DiT): timestep sampling and loss weighting
            (:class:`brushnet.dit.training.FlowMatchingObjective`). flux_guidance: the guidance embedding of
            a guidance-distilled Flux (dev). with_t5 (SD3): false leaves T5 out (its tokens become zeros).
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
        branch_num_layers: int | None = None,
        branch_text: bool = False,
        weighting_scheme: WeightingScheme = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        flux_guidance: float = 3.5,
        with_t5: bool = True,
    ) -> None:
        super().__init__()
        self.nonfinite = NonFiniteSteps(nan_policy, max_consecutive_skips)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or null, got {ema_decay}")
        self.save_hyperparameters()
        self.parts: FamilyParts = load_family(pretrained_model_name_or_path, self.hparams)
        for name, value in self.parts.attributes.items():  # vae, unet / transformer, tokenizer, ...
            setattr(self, name, value)
        for frozen in self.frozen_models():
            frozen.requires_grad_(False)
        self.brushnet = self.parts.build_branch(self).float().train()  # fp32 master weights
        self.ema: nn.Module | None = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(self.brushnet).requires_grad_(False).eval()
        self.weight_dtype = torch.float32
        self.strict_loading = False  # checkpoints hold only the branch (+ EMA); see on_load_checkpoint

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps dropped for a non-finite loss or gradient (see :class:`NonFiniteSteps`)."""
        return self.nonfinite.skipped_steps

    # ------------------------------------------------------------------ models
    def frozen_models(self) -> list[nn.Module]:
        return [m for m in (*self.encoders(), self.denoiser) if m is not None]

    def encoders(self) -> list[nn.Module]:
        """The frozen VAE and text encoder(s)."""
        return [m for m in (getattr(self, n) for n in self.parts.encoders) if m is not None]

    @property
    def denoiser(self) -> nn.Module:
        """The frozen UNet (SD / SDXL) or transformer (SD3 / Flux) the branch feeds."""
        return getattr(self, self.parts.denoiser)

    @property
    def is_sdxl(self) -> bool:
        return self.parts.name == "unet" and self.text_encoder_2 is not None

    def inference_pipeline(self, use_ema: bool = True, scheduler: str | None = None) -> Any:
        """The family's inpainting pipeline sharing this module's models (no copies).

        ``use_ema``: the EMA branch when the module keeps one, else the live branch. ``scheduler``: a
        short name or diffusers class name, built from the base's scheduler config (None: ``unipc`` for
        the UNet family; the DiT pipelines sample with the base's flow-matching Euler scheduler).
        """
        branch = self.ema if use_ema and self.ema is not None else self.brushnet
        pipe = self.parts.pipeline(self, branch, scheduler)
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
            self.denoiser.enable_gradient_checkpointing()

    def configure_model(self) -> None:
        from train.fsdp import FSDP2Strategy

        if self._trainer is not None and isinstance(self.trainer.strategy, FSDP2Strategy):
            self.trainer.strategy.shard(self)

    def train(self, mode: bool = True) -> BrushNetTrainingModule:
        """The branch and the UNet / transformer follow ``mode``; VAE and text encoders stay in eval mode.

        The frozen denoiser is put in train mode so that every gradient-checkpointing check of diffusers
        blocks (some versions test ``self.training``) fires; its dropouts are kept in eval mode, so it
        computes exactly what it computes in eval mode (SD UNets have dropout 0 anyway).
        """
        super().train(mode)
        for m in self.encoders():
            m.eval()
        for m in self.denoiser.modules():
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
        """The training loss of one batch (``use_branch=False``: the frozen base alone, for comparisons)."""
        batch = normalize_batch(batch)  # uint8 loader batches -> float model inputs, on the device
        return self.parts.loss(self, batch, generator, use_branch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.nonfinite.start_micro_batch()
        loss = self.compute_loss(batch, self.step_generator(self._batch_counter()))
        keys = list(batch.get("keys", []))[:8]
        where = f"at step {self.global_step}" + (f" (batch keys {keys})" if keys else "")
        # judged once per optimizer step (on_before_optimizer_step); a NaN loss still runs its backward (every
        # rank reaches the all-reduce), is logged as NaN, and its window's update is dropped
        self.nonfinite.record_loss(loss, where)
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
            # Lightning's mixed-precision plugin refuses to clip the gradients of an optimizer that unscales
            # them itself (fused AdamW), even under bf16 where nothing is scaled: foreach AdamW then.
            allow_fused=not (self.trainer.gradient_clip_val and "mixed" in str(self.trainer.precision)),
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
