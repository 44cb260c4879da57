"""Validation grids: every N steps, inpaint fixed (image, mask, prompt) samples with the module's own
components and log/save one labelled grid per sample: masked input | mask | output | blended | ground truth."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import torch

log = logging.getLogger(__name__)


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


PANELS = ("masked input", "mask", "output", "blended", "ground truth")


def labelled_panels(
    rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str], footers: Sequence[str], min_panel: int = 192
) -> PIL.Image.Image:
    """Rows of equally sized uint8 RGB panels under one bar of column ``labels``, each row with its footer line
    below it, upscaled with nearest neighbour to at least ``min_panel`` px."""
    from PIL import ImageDraw

    height, width = rows[0][0].shape[:2]
    scale, bar = max(1, -(-min_panel // height)), 18
    panel_h, panel_w = height * scale, width * scale
    grid = PIL.Image.new("RGB", (len(labels) * panel_w, bar + len(rows) * (panel_h + bar)), "white")
    draw = ImageDraw.Draw(grid)
    for i, label in enumerate(labels):
        draw.text((i * panel_w + 4, 3), label, fill="black")
    for r, (panels, footer) in enumerate(zip(rows, footers)):
        row = np.concatenate(list(panels), axis=1).repeat(scale, axis=0).repeat(scale, axis=1)
        top = bar + r * (panel_h + bar)
        grid.paste(PIL.Image.fromarray(row), (0, top))
        draw.text((4, top + panel_h + 3), footer, fill="black")
    return grid


def validation_grid(
    image, mask, output, caption: str = "", step: int | None = None, min_panel: int = 192
) -> PIL.Image.Image:
    """masked input | mask | output | blended | ground truth, side by side under their labels, upscaled with
    nearest neighbour to at least ``min_panel`` px, with the caption and the step written below."""
    from brushnet.masks import blurred_blend

    rgb = np.asarray(image.convert("RGB"))
    inpaint = np.asarray(mask.convert("L")) >= 128
    out = np.asarray(output.convert("RGB").resize(image.size))
    masked = rgb * (~inpaint)[..., None].astype(np.uint8)
    mask_rgb = np.repeat((inpaint * 255).astype(np.uint8)[..., None], 3, -1)
    footer = caption if step is None else f"{caption}  (step {step})"
    panels = [masked, mask_rgb, out, blurred_blend(rgb, out, inpaint), rgb]
    return labelled_panels([panels], PANELS, [footer], min_panel)


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
    rank 0 writes. Without a working pipeline the callback logs why and switches itself off. Sample ``i``
    is drawn with seed ``seed + i``; ``seed=None`` (default) takes the module's ``seed`` (the CLI's
    ``--seed_everything``).
    """

    def __init__(
        self,
        samples: list[ValidationSample] | None = None,
        every_n_steps: int = 500,
        resolution: int = 512,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        seed: int | None = None,
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

    def _render(self, trainer, pl_module, folder: Path, write: bool = True) -> None:
        try:
            pipe = pl_module.inference_pipeline(use_ema=self.use_ema)
        except Exception as e:  # e.g. a sharded (FSDP) branch, or no pipeline available
            self.disabled_reason = f"{type(e).__name__}: {e}"
            log.warning(
                "validation grids disabled: cannot build the inference pipeline (%s)", self.disabled_reason
            )
            return
        if write:
            folder.mkdir(parents=True, exist_ok=True)
        modes = {m: m.training for m in (pl_module.brushnet, pl_module.denoiser)}
        for m in modes:
            m.eval()
        grids = []
        seed = pl_module.hparams.get("seed", 0) if self.seed is None else self.seed
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
                    generator=torch.Generator(device="cpu").manual_seed(seed + i),
                    blend=False,
                    output_type="pil",
                ).images[0]
                if not write:
                    continue
                grid = validation_grid(image, mask, output, s.prompt, trainer.global_step)
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
        log.info("validation grids (%s) at %s", " | ".join(PANELS), folder)
        self._log_images(trainer, grids, trainer.global_step)

    @staticmethod
    def _log_images(trainer, grids: list[tuple[str, PIL.Image.Image]], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    "validation",
                    [g for _, g in grids],
                    step=step,
                    caption=[f"{p} (step {step})" for p, _ in grids],
                )
            elif isinstance(logger, TensorBoardLogger):
                for i, (_, g) in enumerate(grids):
                    logger.experiment.add_image(f"validation/{i}", np.asarray(g), step, dataformats="HWC")
