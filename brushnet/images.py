"""Inference inputs: an RGB image and the user's inpainting mask from a file, PIL image or array, with clear
errors naming the file or the sizes; resizing helpers used by the pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image

from brushnet.masks import load_user_mask

ImageInput = str | os.PathLike | PIL.Image.Image | np.ndarray


def load_rgb(image: ImageInput) -> np.ndarray:
    """An RGB image (file path, PIL image or HxWx3/HxW array) as uint8 HxWx3."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"input image {str(path)!r} does not exist")
        try:
            with PIL.Image.open(path) as im:
                return np.asarray(im.convert("RGB")).copy()
        except PIL.UnidentifiedImageError as e:
            raise ValueError(f"input image {str(path)!r} is not an image file PIL can read") from e
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(
            f"an image array must be uint8 HxW, HxWx3 or HxWx4, got dtype {arr.dtype} shape {arr.shape}"
        )
    return np.asarray(PIL.Image.fromarray(arr).convert("RGB")).copy()


def load_inpaint_mask(mask: ImageInput, size_hw: tuple[int, int]) -> np.ndarray:
    """The user's mask (white = inpaint) as bool HxW at ``size_hw``.

    A mask of another size with the same aspect ratio (within 1%) is resized (nearest); any other size is
    an error naming both sizes.
    """
    inpaint = load_user_mask(mask)
    h, w = size_hw
    if inpaint.shape == (h, w):
        return inpaint
    mh, mw = inpaint.shape
    if abs(mw / mh - w / h) > 0.01 * (w / h):
        raise ValueError(
            f"mask size {mw}x{mh} (WxH) does not match the image size {w}x{h} and has another aspect ratio"
        )
    return resize_mask(inpaint, size_hw)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(size_hw):
        return mask
    resized = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize(size_hw[::-1], PIL.Image.NEAREST)
    return np.asarray(resized) >= 128


def resize_rgb(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == tuple(size_hw):
        return rgb
    return np.asarray(PIL.Image.fromarray(rgb).resize(size_hw[::-1], PIL.Image.BICUBIC))
