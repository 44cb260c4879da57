"""Per-sample BrushData training transform (runs inside the DataLoader workers).

Follows ``MyWebDataset.__call__`` of the official ``examples/brushnet/train_brushnet.py`` (and the SDXL
variant for ``original_size``/``crop_top_left``), with these deliberate differences:

* a sample whose segmentation list is empty gets a random brush mask (official: keep everything, i.e. a
  training sample with nothing to inpaint);
* the masked image is computed *after* resize + crop as ``image * keep`` (official: masked at full size,
  then resized separately with bicubic interpolation, which blurs the hole border), so the hole is exactly
  -1.0 and the kept pixels equal ``pixel_values`` exactly;
* the opening (erode + dilate, 8x8 kernel) acts on the object/stroke mask before the optional inversion.
  For segmentation masks this is the official behaviour; for brush masks the official code opens the
  complement (a negligible difference for 128 px strokes);
* ``invert_prob`` is the probability of inpainting *outside* the object/stroke (official: p=0.5, where
  the two cases are symmetric anyway).

All randomness comes from the ``numpy.random.Generator`` passed in, which the dataset seeds from
``(seed, epoch, sample index)``: the result does not depend on worker count or timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from brushnet.brushdata import DecodedSample
from brushnet.conditioning import CaptionTokenizers
from brushnet.masks import inpaint_to_keep, random_brush_mask

# official train_brushnet.py: np.ones((8, 8), np.uint8) for cv2.erode + cv2.dilate
MORPH_KERNEL = np.ones((8, 8), np.uint8)


@dataclass(frozen=True)
class AugmentConfig:
    resolution: int = 512
    random_mask_prob: float = 0.0
    morph_prob: float = 0.3  # official: random.random() < 0.3
    invert_prob: float = 0.5  # official: random.random() < 0.5
    proportion_empty_prompts: float = 0.0

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        for name in ("random_mask_prob", "morph_prob", "invert_prob", "proportion_empty_prompts"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


def choose_inpaint_mask(sample: DecodedSample, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Bool HxW at the stored size, True = region to inpaint (before resize)."""
    h, w = sample.height, sample.width
    use_brush = rng.random() < cfg.random_mask_prob or not sample.masks_rle
    if use_brush:
        region = random_brush_mask(h, w, rng)
    else:
        region = sample.mask(int(rng.integers(len(sample.masks_rle))))
    if rng.random() < cfg.morph_prob:
        region_u8 = region.astype(np.uint8)
        region = cv2.dilate(cv2.erode(region_u8, MORPH_KERNEL, iterations=1), MORPH_KERNEL, iterations=1) > 0
    if rng.random() < cfg.invert_prob:
        region = ~region
    return region


def resize_and_crop(
    image: np.ndarray, keep: np.ndarray, resolution: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Short side to ``resolution`` (bicubic, sizes rounded up as official), then a random square crop.

    ``keep`` has the stored size; ``image`` has it too, or is a reduced-scale decode of it (see
    ``decode_sample(min_size=...)``): both go to the size computed from ``keep``'s, so the crop is the
    same either way. Returns the cropped image (uint8 HxWx3), keep mask (bool HxW) and the crop's
    (top, left) in the resized image (SDXL's ``crops_coords_top_left``)."""
    h, w = keep.shape
    scale = resolution / min(h, w)
    h_new, w_new = max(resolution, int(np.ceil(h * scale))), max(resolution, int(np.ceil(w * scale)))
    image = cv2.resize(image, (w_new, h_new), interpolation=cv2.INTER_CUBIC)
    # official: bicubic resize of the 0/1 uint8 mask, which rounds back to {0, 1}
    keep = cv2.resize(keep.astype(np.uint8), (w_new, h_new), interpolation=cv2.INTER_CUBIC) > 0
    top = int(rng.integers(0, h_new - resolution + 1))
    left = int(rng.integers(0, w_new - resolution + 1))
    window = (slice(top, top + resolution), slice(left, left + resolution))
    return image[window], keep[window], (top, left)


def make_example(
    sample: DecodedSample, rng: np.random.Generator, cfg: AugmentConfig, tokenizers: CaptionTokenizers
) -> dict:
    """One training example: the uint8 crop (HxWx3) and keep-mask (bool HxW) as the workers send them, the
    sizes, the key and the token ids. :func:`normalize_batch` makes the float model inputs on the device."""
    keep = np.asarray(inpaint_to_keep(choose_inpaint_mask(sample, rng, cfg)), dtype=bool)
    image, keep, crop_top_left = resize_and_crop(sample.image, keep, cfg.resolution, rng)
    caption = "" if rng.random() < cfg.proportion_empty_prompts else sample.caption
    example = {
        "image": image,
        "keep": keep,
        "original_size": (sample.height, sample.width),
        "crop_top_left": crop_top_left,
        "key": sample.key,
    }
    example.update(tokenizers(caption))
    return example


def normalize_batch(batch: dict) -> dict:
    """The model inputs of a loader batch, computed where the batch is (the GPU in training): uint8
    ``pixel_values`` (0..255) and ``masks`` (1 = keep) -> float32 ``pixel_values`` in [-1, 1],
    ``conditioning_pixel_values`` (official: ``image * mask / 127.5 - 1``, so the hole is -1.0) and float
    ``masks``. A batch that is float already (a custom dataset, the tests) is returned as it is."""
    pixels = batch["pixel_values"]
    if pixels.is_floating_point():
        return batch
    pixels = pixels.float().contiguous()
    keep = batch["masks"].float().contiguous()
    return {
        **batch,
        "pixel_values": pixels / 127.5 - 1.0,
        "conditioning_pixel_values": (pixels * keep) / 127.5 - 1.0,
        "masks": keep,
    }
