"""Periodic BrushBench-style evaluation during training (a Lightning callback around
:func:`brushnet.evaluation.evaluate.evaluate_subset`).

Every ``every_n_steps`` optimizer steps, global rank 0 inpaints a small fixed subset of a benchmark folder
(the first ``num_images`` entries of its ``mapping_file.json``) with the current branch, scores it with every
available metric and logs the means as ``eval/<metric>`` to all of the trainer's loggers. The pipeline is
built from the LightningModule by ``pipeline_factory`` (default: the module's
``inference_pipeline(use_ema=..., scheduler=...)``, see
:meth:`train.module.BrushNetTrainingModule.inference_pipeline`). Sharded strategies (FSDP) need a factory
that returns a pipeline usable on rank 0 alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from brushnet.evaluation.benchmark import DEFAULT_SEED, GenerationSettings, load_mapping
from brushnet.evaluation.evaluate import Evaluator, evaluate_subset
from brushnet.evaluation.scorers import ModelPaths, load_model_paths


class BenchmarkEvalCallback(L.Callback):
    """Evaluate a fixed benchmark subset every ``every_n_steps`` steps and log ``eval/<metric>`` means."""

    def __init__(
        self,
        benchmark: str | os.PathLike,
        every_n_steps: int = 1000,
        num_images: int = 8,
        mask_kind: str = "inside",
        metrics_config: str | os.PathLike | None = None,
        steps: int = 25,
        guidance: float = 7.5,
        conditioning_scale: float = 1.0,
        blended: bool = False,
        seed: int = DEFAULT_SEED,
        scheduler: str = "unipc",
        use_ema: bool = True,
        pipeline_factory: Callable[[Any], Any] | None = None,
    ):
        if every_n_steps < 1 or num_images < 1:
            raise ValueError(f"every_n_steps and num_images must be >= 1, got {every_n_steps}, {num_images}")
        self.root = Path(benchmark)
        self.items = load_mapping(self.root / "mapping_file.json", mask_kind)[:num_images]  # type: ignore[arg-type]
        self.every_n_steps = every_n_steps
        self.metrics_config = metrics_config
        self.settings = GenerationSettings(
            base="(training)",
            brushnet="(training)",
            mask_kind=mask_kind,  # type: ignore[arg-type]
            blended=blended,
            conditioning_scale=conditioning_scale,
            scheduler=scheduler,
            steps=steps,
            guidance=guidance,
            seed=seed,
        )
        self.pipeline_factory = pipeline_factory or (
            lambda m: _module_pipeline(m, use_ema=use_ema, scheduler=scheduler)
        )
        self._evaluator: Evaluator | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    def _get_evaluator(self, device: str) -> Evaluator:
        if self._evaluator is None:
            paths = load_model_paths(self.metrics_config) if self.metrics_config else ModelPaths()
            self._evaluator = Evaluator.from_paths(paths, device=device)
        return self._evaluator

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        self.last_metrics = self.evaluate(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(self.last_metrics, step=step)

    def evaluate(self, pl_module) -> dict[str, float]:
        """Run the subset evaluation now; returns ``{"eval/<metric>": mean}``."""
        branch = getattr(pl_module, "brushnet", None)
        was_training = branch.training if branch is not None else False
        if branch is not None:
            branch.eval()
        try:
            pipe = self.pipeline_factory(pl_module)
            evaluator = self._get_evaluator(str(pl_module.device))
            result = evaluate_subset(pipe, self.items, self.root, self.settings, evaluator)
        finally:
            if branch is not None and was_training:
                branch.train()
        return {f"eval/{k}": v for k, v in result.metrics.items()}


def _module_pipeline(module: Any, **kwargs: Any):
    if not hasattr(module, "inference_pipeline"):
        raise AttributeError(
            f"{type(module).__name__} has no inference_pipeline(); pass pipeline_factory= to BenchmarkEvalCallback"
        )
    return module.inference_pipeline(**kwargs)
