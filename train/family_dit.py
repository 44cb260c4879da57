"""The DiT families (SD3 / SD3.5, Flux.1) of :class:`train.module.BrushNetTrainingModule`.

The model side is :mod:`brushnet.dit`: the family interface (:mod:`brushnet.dit.family`), the
flow-matching objective on a trainer batch (:func:`brushnet.dit.training.batch_loss`: target
``noise - latents``, SD3's timestep sampling and loss weighting, the shift of the base's scheduler config,
Flux's packed latents, image ids and guidance embedding) and the inpainting pipelines. This module only
holds the frozen base, builds or loads the branch and adapts the module's hyperparameters.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from brushnet.dit.family import family_of, load_dit_base, pipeline_class
from brushnet.dit.loading import check_branch_matches_transformer, load_dit_branch
from brushnet.dit.training import FlowMatchingObjective, batch_loss
from train.data.transforms import normalize_batch

# Options of the UNet family, at the values that mean "not used" (a set one is refused).
UNET_ONLY = {
    "variant": None,
    "vae": None,
    "revision": None,
    "min_snr_gamma": None,
    "noise_offset": 0.0,
    "injection": "full",
    "condition_encoder": "vae",
    "branch_cross_attention": False,
    "single_branch": False,
}
# Scheduler names the DiT pipelines accept: they sample with the base's flow-matching Euler scheduler.
FLOW_MATCH_SCHEDULERS = (None, "flow_match_euler", "FlowMatchEulerDiscreteScheduler")


class DiTParts:
    """An SD3 / Flux base's frozen parts (set on the module as ``vae``, ``transformer``, ``text_encoder[_2,_3]``),
    branch, loss and pipeline."""

    denoiser = "transformer"
    encoders = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    # the module attributes the brushnet.dit functions take as a components dict (pipeline names)
    COMPONENTS = (*encoders, denoiser, "tokenizer", "tokenizer_2", "tokenizer_3")

    def __init__(self, base: str, hp: Any) -> None:
        self.family = family_of(base)
        self.name = self.family.name
        components = load_dit_base(base, with_t5=hp.with_t5)
        self.attributes = {n: components.get(n) for n in self.COMPONENTS}
        self.attributes["noise_scheduler"] = components["scheduler"]

    @classmethod
    def components(cls, m: Any) -> dict[str, Any]:
        return {**{n: getattr(m, n) for n in cls.COMPONENTS}, "scheduler": m.noise_scheduler}

    def build_branch(self, m: Any) -> nn.Module:
        """A loaded branch (checked against the base) or a new one from the transformer."""
        hp = m.hparams
        if hp.brushnet_model_name_or_path:
            branch = load_dit_branch(hp.brushnet_model_name_or_path, torch_dtype=torch.float32)
            check_branch_matches_transformer(branch, m.transformer)
            return branch
        return self.family.build_branch(m.transformer, hp.branch_num_layers, hp.branch_text)

    @staticmethod
    def objective(hp: Any) -> FlowMatchingObjective:
        return FlowMatchingObjective(
            weighting_scheme=hp.weighting_scheme,
            logit_mean=hp.logit_mean,
            logit_std=hp.logit_std,
            mode_scale=hp.mode_scale,
            guidance=hp.flux_guidance,
        )

    def loss(self, m: Any, batch: dict, generator: torch.Generator, use_branch: bool = True) -> torch.Tensor:
        """The flow-matching loss of one batch for module ``m`` (``use_branch=False``: the frozen base alone)."""
        batch = normalize_batch(batch)  # uint8 loader batches -> float model inputs, on the device
        objective = self.objective(m.hparams)
        return batch_loss(
            self.family, self.components(m), m.brushnet, batch, objective, generator, use_branch
        )

    def pipeline(self, m: Any, branch: nn.Module, scheduler: str | None) -> Any:
        """The family's inpainting pipeline sharing ``m``'s models, with a fresh flow-matching scheduler."""
        if scheduler not in FLOW_MATCH_SCHEDULERS:
            raise ValueError(
                f"scheduler {scheduler!r}: the {self.name} pipeline samples with the base's flow-matching "
                f"Euler scheduler; expected one of {[s for s in FLOW_MATCH_SCHEDULERS if s]} or None"
            )
        cls = pipeline_class(self.name)
        components = self.components(m)
        parts = {
            k: components.get(k)
            for k in inspect.signature(cls.__init__).parameters
            if k not in ("self", "brushnet", "scheduler")
        }
        base_scheduler = m.noise_scheduler
        return cls(
            brushnet=branch, scheduler=type(base_scheduler).from_config(base_scheduler.config), **parts
        )
