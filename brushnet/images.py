"""Inference inputs: an RGB image and the user's inpainting mask from a file, PIL image or array, with clear
errors naming the file or the sizes; resizing helpers; the input preparation and call-option checks that
every pipeline (UNet, SD3, Flux) shares."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class InpaintInputs:
    """One pipeline call's image and mask, prepared the same way for every base family."""

    rgb: np.ndarray  # the input image, uint8 H x W x 3 at its own size (blending pastes into it)
    inpaint: np.ndarray  # bool H x W at the input size, True = inpaint
    size_hw: tuple[int, int]  # the processing size, multiples of the pipeline's factor
    keep: np.ndarray  # bool at the processing size, True = keep
    masked_rgb: np.ndarray  # uint8 at the processing size, the hole black (-1 after normalising)


def prepare_inpaint_inputs(
    image: ImageInput, mask: ImageInput, height: int | None, width: int | None, multiple: int
) -> InpaintInputs:
    """Load ``image`` and the user's ``mask`` (white = inpaint) and prepare them at the processing size:
    ``height``/``width``, by default the image size rounded down to a multiple of ``multiple``."""
    rgb = load_rgb(image)
    full_hw = rgb.shape[:2]
    inpaint = load_inpaint_mask(mask, full_hw)
    size_hw = (height or full_hw[0] // multiple * multiple, width or full_hw[1] // multiple * multiple)
    if min(size_hw) < multiple or size_hw[0] % multiple or size_hw[1] % multiple:
        raise ValueError(
            f"processing size {size_hw[1]}x{size_hw[0]} (WxH) must be positive multiples of {multiple}"
        )
    keep = ~resize_mask(inpaint, size_hw)
    masked_rgb = resize_rgb(rgb, size_hw) * keep[..., None].astype(np.uint8)
    return InpaintInputs(rgb, inpaint, size_hw, keep, masked_rgb)


def prompt_lists(
    prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None
) -> tuple[list[str], list[str] | None]:
    """Prompts as a list, and the negative prompts as a list of the same length (None when not given)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if negative_prompt is None:
        return prompts, None
    negatives = (
        [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    )
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts")
    return prompts, negatives


def check_call_options(control_guidance_start: float, control_guidance_end: float, output_type: str) -> None:
    """The pipeline-call options every family checks the same way."""
    if not 0.0 <= control_guidance_start < control_guidance_end <= 1.0:
        raise ValueError(
            "need 0 <= control_guidance_start < control_guidance_end <= 1, got "
            f"{control_guidance_start} and {control_guidance_end}"
        )
    if output_type not in ("pil", "np", "latent"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
