"""Training callbacks: atomic checkpoints + diffusers export, validation grids, throughput/memory.

* :class:`BrushNetCheckpoint` -- Lightning ``ModelCheckpoint`` whose writes are atomic (temp + rename), which
  refuses to save non-finite weights, and which exports the branch (and its EMA) as official-format
  diffusers folders at every checkpoint. Its default folder is ``<default_root_dir>/checkpoints`` (not
  per logger version), so ``ckpt_path="last"`` finds the previous run's ``last.ckpt``.
* :class:`ValidationGrids` -- every N steps, inpaint fixed (image, mask, prompt) samples with the
  module's own components and log/save one grid per sample: masked input | mask | output | blended.
* :class:`TrainingMonitor` -- samples/s, peak memory, learning rate, bad samples read by the DataModule.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import PIL.Image
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- export
def atomic_save_pretrained(model, folder: str | os.PathLike) -> Path:
    """``model.save_pretrained(folder)`` written to a temporary sibling folder and renamed when complete."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_branches(pl_module, folder: str | os.PathLike, rank: int) -> list[Path]:
    """Export ``brushnet`` (and ``ema`` as ``brushnet_ema``) into ``folder``; collective under FSDP2."""
    from train.fsdp import export_branch, is_sharded

    out = []
    models = [("brushnet", pl_module.brushnet)]
    if getattr(pl_module, "ema", None) is not None:
        models.append(("brushnet_ema", pl_module.ema))
    for name, model in models:
        target = Path(folder) / name
        if is_sharded(model.parameters()):
            done = export_branch(model, target, rank=rank)
        else:
            done = atomic_save_pretrained(model, target) if rank == 0 else None
        if done is not None:
            out.append(done)
    return out


def save_checkpoint_atomically(trainer: L.Trainer, filepath: str, weights_only: bool = False) -> None:
    """``trainer.save_checkpoint`` (collective) to a temporary sibling, renamed on rank 0 when complete."""
    # No "last" in the temporary name: Lightning's ckpt_path="last" search must never pick it up.
    tmp = os.path.join(os.path.dirname(filepath), f".{uuid.uuid4().hex[:12]}.partial-{os.getpid()}")
    tmp = trainer.strategy.broadcast(tmp)
    trainer.save_checkpoint(tmp, weights_only)  # collective; ends with a barrier
    if trainer.is_global_zero:
        if os.path.isdir(tmp) and os.path.isdir(filepath):  # sharded (distributed) checkpoint folders
            shutil.rmtree(filepath)
        os.replace(tmp, filepath)
    trainer.strategy.barrier("save_checkpoint_atomically")


class BrushNetCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` + atomic writes + finite-weights check + diffusers export of the branch (and EMA).

    Keep the last K checkpoints with ``monitor="step", mode="max", save_top_k=K`` (as the configs do).
    Exports go to ``<export_dir>/step-XXXXXXXX/{brushnet,brushnet_ema}`` (default export_dir:
    ``<checkpoint dir>/../export``), pruned to the newest ``keep_exports`` (default: ``save_top_k``).
    """

    def __init__(
        self,
        *args: Any,
        export: bool = True,
        export_dir: str | None = None,
        keep_exports: int | None = None,
        save_on_train_end: bool = True,
        save_last: bool | None = True,
        auto_insert_metric_name: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args, save_last=save_last, auto_insert_metric_name=auto_insert_metric_name, **kwargs
        )
        self.export = export
        self.export_dir = export_dir
        self.keep_exports = keep_exports
        self.save_on_train_end = save_on_train_end
        self._exported_step = -1
        self.last_export: Path | None = None

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and os.path.isdir(self.dirpath):
            for stale in Path(self.dirpath).glob(".*.partial-*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Also checkpoint (and export) the final step, unless it was just saved."""
        if self.save_on_train_end and trainer.global_step != self._last_global_step_saved:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    @property
    def export_root(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.dirpath).parent / "export"

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        check = getattr(module, "branch_is_finite", None)
        if check is not None and not check():
            raise RuntimeError(
                f"refusing to write {filepath}: the branch (or its EMA) has NaN/Inf weights at step "
                f"{trainer.global_step}; the previous checkpoints are left untouched"
            )
        save_checkpoint_atomically(trainer, filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        if self.export and trainer.global_step != self._exported_step:
            self._exported_step = trainer.global_step
            self._export(trainer, module)

    def _export(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        folder = self.export_root / f"step-{trainer.global_step:08d}"
        done = export_branches(module, folder, trainer.global_rank)
        if trainer.is_global_zero and done:
            self.last_export = folder
            log.info("exported %s", ", ".join(str(p) for p in done))
            keep = self.keep_exports if self.keep_exports is not None else max(self.save_top_k, 1)
            steps = sorted(p for p in self.export_root.glob("step-*") if p.is_dir())
            for old in steps[: max(0, len(steps) - keep)]:
                shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("BrushNetCheckpoint.export")


# ------------------------------------------------------------------------------------------ validation
@dataclass
class ValidationSample:
    """One fixed validation input. ``image``: a file or ``skimage:<name>`` (a photo shipped with
    scikit-image); ``mask``: a file (white = inpaint) or ``box:x0,y0,x1,y1`` in fractions of the size."""

    image: str
    mask: str
    prompt: str


def load_validation_image(spec: str, resolution: int) -> PIL.Image.Image:
    if spec.startswith("skimage:"):
        import skimage.data

        name = spec.split(":", 1)[1]
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"validation image {spec!r}: skimage.data has no photo {name!r}")
        arr = np.asarray(loader())
        arr = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
        image = PIL.Image.fromarray(arr.astype(np.uint8))
    else:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"validation image {spec!r} does not exist")
        image = PIL.Image.open(spec).convert("RGB")
    return _center_square(image, resolution, PIL.Image.BICUBIC)


def load_validation_mask(spec: str, resolution: int) -> PIL.Image.Image:
    """White (255) = inpaint, as every user-facing mask."""
    if spec.startswith("box:"):
        try:
            x0, y0, x1, y1 = (float(v) for v in spec[4:].split(","))
        except ValueError as e:
            raise ValueError(f"validation mask {spec!r}: expected box:x0,y0,x1,y1 (fractions)") from e
        arr = np.zeros((resolution, resolution), np.uint8)
        arr[int(y0 * resolution) : int(y1 * resolution), int(x0 * resolution) : int(x1 * resolution)] = 255
        return PIL.Image.fromarray(arr)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"validation mask {spec!r} does not exist")
    return _center_square(PIL.Image.open(spec).convert("L"), resolution, PIL.Image.NEAREST)


def _center_square(image: PIL.Image.Image, size: int, resample) -> PIL.Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), resample)


def validation_grid(image, mask, output) -> PIL.Image.Image:
    """masked input | mask | output | blended, side by side."""
    from brushnet.masks import blurred_blend

    rgb = np.asarray(image.convert("RGB"))
    inpaint = np.asarray(mask.convert("L")) >= 128
    out = np.asarray(output.convert("RGB").resize(image.size))
    masked = rgb * (~inpaint)[..., None].astype(np.uint8)
    mask_rgb = np.repeat((inpaint * 255).astype(np.uint8)[..., None], 3, -1)
    blended = blurred_blend(rgb, out, inpaint)
    return PIL.Image.fromarray(np.concatenate([masked, mask_rgb, out, blended], axis=1))


def bounded_barrier(key: str, rank: int, world_size: int, timeout_s: float) -> None:
    """Rank 0 calls this when done; the other ranks wait for it, at most ``timeout_s`` seconds.

    Uses the process group's key-value store, so it works with every backend (gloo, nccl) and does not
    hang forever if rank 0 dies or stalls.
    """
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    if rank == 0:
        store.set(key, "done")
        return
    try:
        store.wait([key], timedelta(seconds=timeout_s))
    except Exception as e:  # the store raises a RuntimeError/DistStoreError on timeout
        raise RuntimeError(
            f"rank {rank} waited more than {timeout_s:.0f} s for rank 0 to finish the validation ({key}); "
            "raise ValidationGrids(barrier_timeout_s=...) or check rank 0's log"
        ) from e


class ValidationGrids(L.Callback):
    """Inpaint fixed samples every ``every_n_steps`` with the training components (no second model copy).

    Grids go to ``<out_dir or trainer.log_dir/validation>/step-XXXXXXXX/<i>.png`` and to every logger that
    takes images (W&B, TensorBoard). Under DDP global rank 0 renders; the other ranks wait at a bounded
    barrier. Under FSDP2 (sharded branch) every rank renders, since each forward gathers the shards, and
    rank 0 writes. Without a working pipeline the callback logs why and switches itself off.
    """

    def __init__(
        self,
        samples: list[ValidationSample] | None = None,
        every_n_steps: int = 500,
        resolution: int = 512,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        seed: int = 0,
        use_ema: bool = False,
        out_dir: str | None = None,
        at_end: bool = True,
        barrier_timeout_s: float = 1800.0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.samples = [
            s if isinstance(s, ValidationSample) else ValidationSample(**s) for s in samples or []
        ]
        self.every_n_steps = every_n_steps
        self.resolution = resolution
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.conditioning_scale = conditioning_scale
        self.seed = seed
        self.use_ema = use_ema
        self.out_dir = out_dir
        self.at_end = at_end
        self.barrier_timeout_s = barrier_timeout_s
        self.disabled_reason: str | None = None
        self._done_step = -1
        self.written: list[Path] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for s in self.samples:  # fail at start, not after hours, on a missing file / bad spec
            load_validation_image(s.image, 8)
            load_validation_mask(s.mask, 8)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.samples or step == self._done_step:
            return
        self._done_step = step
        # trainer.log_dir is a collective under DDP (a broadcast): every rank asks for it, before rank 0 renders
        root = (
            Path(self.out_dir)
            if self.out_dir
            else Path(trainer.log_dir or trainer.default_root_dir) / "validation"
        )
        folder = root / f"step-{step:08d}"
        from train.fsdp import is_sharded

        if is_sharded(pl_module.brushnet.parameters()):
            # FSDP2: every forward all-gathers the shards, a collective, so all ranks render the same
            # samples in lockstep (no barrier needed) and rank 0 writes and logs.
            if self.disabled_reason is None:
                self._render(trainer, pl_module, folder, write=trainer.is_global_zero)
            return
        if trainer.is_global_zero:
            try:
                if self.disabled_reason is None:
                    self._render(trainer, pl_module, folder)
            finally:  # the other ranks are released even if rendering failed
                bounded_barrier(f"brushnet-validation-{step}", 0, trainer.world_size, self.barrier_timeout_s)
        else:
            bounded_barrier(
                f"brushnet-validation-{step}", trainer.global_rank, trainer.world_size, self.barrier_timeout_s
            )

    def pipeline(self, pl_module):
        from brushnet.pipeline import BrushNetInpaintPipeline, make_scheduler

        branch = pl_module.ema if self.use_ema and getattr(pl_module, "ema", None) is not None else None
        pipe = BrushNetInpaintPipeline(
            vae=pl_module.vae,
            text_encoder=pl_module.text_encoder,
            tokenizer=pl_module.tokenizer,
            unet=pl_module.unet,
            brushnet=branch or pl_module.brushnet,
            scheduler=make_scheduler("unipc", pl_module.noise_scheduler.config),
            text_encoder_2=pl_module.text_encoder_2,
            tokenizer_2=pl_module.tokenizer_2,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _render(self, trainer, pl_module, folder: Path, write: bool = True) -> None:
        try:
            pipe = self.pipeline(pl_module)
        except Exception as e:  # e.g. a sharded (FSDP) branch, or no pipeline available
            self.disabled_reason = f"{type(e).__name__}: {e}"
            log.warning(
                "validation grids disabled: cannot build the inference pipeline (%s)", self.disabled_reason
            )
            return
        if write:
            folder.mkdir(parents=True, exist_ok=True)
        modes = {m: m.training for m in (pl_module.brushnet, pl_module.unet)}
        for m in modes:
            m.eval()
        grids = []
        try:
            for i, s in enumerate(self.samples):
                image = load_validation_image(s.image, self.resolution)
                mask = load_validation_mask(s.mask, self.resolution)
                output = pipe(
                    prompt=s.prompt,
                    image=image,
                    mask=mask,
                    num_inference_steps=self.num_inference_steps,
                    guidance_scale=self.guidance_scale,
                    brushnet_conditioning_scale=self.conditioning_scale,
                    generator=torch.Generator(device="cpu").manual_seed(self.seed + i),
                    blend=False,
                    output_type="pil",
                ).images[0]
                if not write:
                    continue
                grid = validation_grid(image, mask, output)
                path = folder / f"{i:02d}.png"
                tmp = folder / f".{i:02d}.png.partial"
                grid.save(tmp, format="PNG")
                os.replace(tmp, path)
                self.written.append(path)
                grids.append((s.prompt, grid))
        finally:
            for m, training in modes.items():
                m.train(training)
            pl_module.train(pl_module.training)  # re-apply the module's eval rules for frozen parts
        if not write:
            return
        log.info("validation grids (masked input | mask | output | blended) at %s", folder)
        self._log_images(trainer, grids, trainer.global_step)

    @staticmethod
    def _log_images(trainer, grids: list[tuple[str, PIL.Image.Image]], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "validation", [g for _, g in grids], step=step, caption=[p for p, _ in grids]
                )
            elif isinstance(logger, TensorBoardLogger):
                for i, (_, g) in enumerate(grids):
                    logger.experiment.add_image(f"validation/{i}", np.asarray(g), step, dataformats="HWC")


# -------------------------------------------------------------------------------------------- monitor
def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: the accelerator's allocator peak, or the CPU process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class TrainingMonitor(L.Callback):
    """Logs ``train/samples_per_s`` (all ranks), ``train/peak_mem_gb``, ``train/lr`` and
    ``train/bad_samples`` (the DataModule's running count of skipped samples)."""

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch["pixel_values"].shape[0] * trainer.world_size
        if (batch_idx + 1) % self.log_every_n_steps:
            return
        now = time.perf_counter()
        metrics = {
            "train/samples_per_s": self._samples / max(now - self._t0, 1e-9),
            "train/peak_mem_gb": peak_memory_gb(pl_module.device),
        }
        if trainer.optimizers:
            metrics["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "bad_samples"):
            metrics["train/bad_samples"] = float(datamodule.bad_samples)
        pl_module.log_dict(metrics, batch_size=batch["pixel_values"].shape[0], rank_zero_only=True)
        self._t0, self._samples = now, 0
