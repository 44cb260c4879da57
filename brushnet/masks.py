"""Masks: the RLE codecs of BrushData and BrushBench, the random brush generator, the one conversion
between mask conventions, user mask files, and blurred blending of a generated image into the original.

Conventions (the only place they are converted is :func:`inpaint_to_keep` / :func:`keep_to_inpaint`):

- user-facing masks (files, CLI, pipeline input): white (>= 128) = region to inpaint;
- the model's mask channel: 1 = keep, 0 = inpaint (official train_brushnet.py: ``masked_image = image * mask``);
- BrushData segmentation RLE: 1 = object pixel (the data loader picks one object and may invert it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw

from brushnet.errors import BrushNetError


class MaskError(BrushNetError, ValueError):
    """A mask or RLE that is malformed or does not fit the image it belongs to."""


# ----------------------------------------------------------------------------------------------------------
# RLE codecs. Both formats are flat [start, length, start, length, ...] with 1-based starts and 1 = object;
# BrushData (official train_brushnet.py, MyWebDataset.rle2mask) runs over the column-major (order='F')
# flattening, BrushBench/EditBench (official evaluate_brushnet.py, rle2mask) over the row-major one.
# ----------------------------------------------------------------------------------------------------------


def _rle_encode(mask: np.ndarray, order: str) -> list[int]:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"RLE encoding needs a 2-D (HxW) mask, got shape {mask.shape}")
    flat = mask.astype(bool, copy=False).ravel(order=order)
    padded = np.empty(flat.size + 2, dtype=bool)
    padded[0] = padded[-1] = False
    padded[1:-1] = flat
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # alternating run starts and ends (0-based, exclusive)
    rle = np.empty(edges.size, dtype=np.int64)
    rle[0::2] = edges[0::2] + 1  # 1-based starts
    rle[1::2] = edges[1::2] - edges[0::2]
    return rle.tolist()


def _rle_runs(rle: Any, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-based (starts, ends) of an RLE over ``height * width`` pixels (vectorised)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise MaskError(f"RLE {name} must be a positive integer, got {value!r}")
    try:
        arr = np.asarray(rle)
    except Exception as e:  # ragged nested lists and the like
        raise MaskError(f"RLE is not a flat list of integers: {e}") from e
    if arr.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    if arr.ndim != 1:
        raise MaskError(f"RLE must be a flat list [start, length, ...], got an array of shape {arr.shape}")
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)  # integral floats (e.g. from a float JSON writer) are fine
    if arr.dtype.kind not in "iu":
        raise MaskError(f"RLE must hold integers, got dtype {arr.dtype} (first values {arr[:4].tolist()})")
    if arr.size % 2:
        raise MaskError(f"RLE has odd length {arr.size}: expected [start, length] pairs")
    arr = arr.astype(np.int64)
    starts, lengths = arr[0::2] - 1, arr[1::2]
    n = int(height) * int(width)
    bad = np.flatnonzero(starts < 0)
    if bad.size:
        i = int(bad[0])
        raise MaskError(f"RLE run {i} starts at {int(starts[i]) + 1}: starts are 1-based (must be >= 1)")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        i = int(bad[0])
        raise MaskError(f"RLE run {i} has length {int(lengths[i])}: lengths must be >= 1")
    # Compare without forming starts + lengths first: huge values would overflow int64.
    bad = np.flatnonzero((starts >= n) | (lengths > n - starts))
    if bad.size:
        i = int(bad[0])
        raise MaskError(
            f"RLE run {i} (start {int(starts[i]) + 1}, length {int(lengths[i])}) runs past the "
            f"{height}x{width} mask's {n} pixels"
        )
    ends = starts + lengths
    bad = np.flatnonzero(starts[1:] < ends[:-1])
    if bad.size:
        i = int(bad[0])
        raise MaskError(
            f"RLE runs {i} and {i + 1} are unsorted or overlap: run {i + 1} starts at {int(starts[i + 1]) + 1} "
            f"before run {i} ends (pixel {int(ends[i])})"
        )
    return starts, ends


def _rle_decode(rle: Any, height: int, width: int, order: str) -> np.ndarray:
    starts, ends = _rle_runs(rle, height, width)
    n = height * width
    # Alternating background/object segments: gap before run 0, run 0, gap, run 1, ..., tail gap.
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)
    counts[0:-1:2] = starts - np.concatenate(([0], ends[:-1]))
    counts[1::2] = ends - starts
    counts[-1] = n - (ends[-1] if ends.size else 0)
    values = np.zeros(counts.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if order == "F":  # cv2's blocked transpose: ~18x faster than numpy's copy of the transposed view
        return cv2.transpose(flat.view(np.uint8).reshape(width, height)).view(bool)
    return flat.reshape(height, width)


def brushdata_rle_encode(mask: np.ndarray) -> list[int]:
    """BrushData RLE of a HxW mask (nonzero = object): column-major, 1-based ``[start, length, ...]``."""
    return _rle_encode(mask, "F")


def brushdata_rle_decode(rle: Any, height: int, width: int) -> np.ndarray:
    """Bool HxW mask (True = object) of a BrushData RLE; :class:`MaskError` if it is malformed or out of
    bounds (odd length, start < 1, length < 1, run past ``height * width``, unsorted/overlapping runs)."""
    return _rle_decode(rle, height, width, "F")


def brushdata_rle_check(rle: Any, height: int, width: int) -> None:
    """Raise :class:`MaskError` if :func:`brushdata_rle_decode` would; decodes nothing."""
    _rle_runs(rle, height, width)


def benchmark_rle_encode(mask: np.ndarray) -> list[int]:
    """BrushBench/EditBench RLE of a HxW mask (nonzero = inpaint): row-major, 1-based ``[start, length, ...]``."""
    return _rle_encode(mask, "C")


def benchmark_rle_decode(rle: Any, height: int = 512, width: int = 512) -> np.ndarray:
    """Bool HxW mask of a BrushBench/EditBench RLE (row-major; the benchmarks are 512x512 in the official
    evaluate_brushnet.py). Same validation as :func:`brushdata_rle_decode`."""
    return _rle_decode(rle, height, width, "C")


# ----------------------------------------------------------------------------------------------------------
# Random brush masks (official train_brushnet.py, MyWebDataset.random_brush_gen; defaults are its numbers).
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrushStrokes:
    """What :func:`random_brush_mask` draws: each stroke's vertices (x, y), its width, and the final flips."""

    strokes: list[list[tuple[int, int]]]
    width: int
    flip_rows: bool
    flip_cols: bool


def sample_brush_strokes(
    height: int,
    width: int,
    rng: np.random.Generator,
    max_strokes: int = 4,
    max_vertices: int = 8,
    brush_width: int = 128,
    mean_angle: float = 2 * math.pi / 5,
    angle_range: float = 2 * math.pi / 15,
) -> BrushStrokes:
    """The random strokes of :func:`random_brush_mask` (``rng.integers(max_strokes)`` strokes, each with
    ``rng.integers(0, max_vertices)`` vertices after its random start point)."""
    if height < 1 or width < 1:
        raise MaskError(f"brush mask size must be positive, got {height}x{width} (HxW)")
    if max_strokes < 1 or max_vertices < 1 or brush_width < 1:
        raise MaskError(
            f"max_strokes, max_vertices and brush_width must be >= 1, got {max_strokes}, {max_vertices}, "
            f"{brush_width}"
        )
    average_radius = math.sqrt(height * height + width * width) / 8
    strokes = []
    for _ in range(int(rng.integers(max_strokes))):
        num_vertex = int(rng.integers(0, max_vertices))
        angle_min = mean_angle - rng.uniform(0, angle_range)
        angle_max = mean_angle + rng.uniform(0, angle_range)
        angles = [
            2 * math.pi - rng.uniform(angle_min, angle_max)
            if i % 2 == 0
            else rng.uniform(angle_min, angle_max)
            for i in range(num_vertex)
        ]
        # Fix of the official code: it reads `h, w = mask.size`, but PIL's size is (W, H), so on a
        # non-square image x was drawn in [0, H) and y in [0, W). Here x spans the width, y the height.
        vertices = [(int(rng.integers(0, width)), int(rng.integers(0, height)))]
        for angle in angles:
            # `average_radius // 2` (floor) as in the official code.
            r = np.clip(rng.normal(loc=average_radius, scale=average_radius // 2), 0, 2 * average_radius)
            x = np.clip(vertices[-1][0] + r * math.cos(angle), 0, width)
            y = np.clip(vertices[-1][1] + r * math.sin(angle), 0, height)
            vertices.append((int(x), int(y)))
        strokes.append(vertices)
        # Draws kept only so that a random stream gives the official strokes: the width draw
        # (uniform(min_width, max_width) with both 128), and the two per-stroke `mask.transpose(FLIP_...)`
        # coin flips, whose results the official code discards (no-ops).
        rng.uniform(brush_width, brush_width)
        rng.random(2)
    # The official final numpy flips (p = 0.5 each) do apply.
    return BrushStrokes(strokes, int(brush_width), bool(rng.random() > 0.5), bool(rng.random() > 0.5))


def draw_brush_strokes(strokes: BrushStrokes, height: int, width: int) -> np.ndarray:
    """Bool HxW mask (True = stroke): each stroke is a polyline of its width with round joints (a disc at
    every vertex, as in the official code), then the flips."""
    canvas = PIL.Image.new("L", (width, height), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    half = strokes.width // 2
    for vertices in strokes.strokes:
        if len(vertices) > 1:
            draw.line(vertices, fill=1, width=strokes.width)
        for x, y in vertices:
            draw.ellipse((x - half, y - half, x + half, y + half), fill=1)
    mask = np.asarray(canvas, dtype=bool)
    if strokes.flip_rows:
        mask = mask[::-1]
    if strokes.flip_cols:
        mask = mask[:, ::-1]
    return np.ascontiguousarray(mask)


def random_brush_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    max_strokes: int = 4,
    max_vertices: int = 8,
    brush_width: int = 128,
    mean_angle: float = 2 * math.pi / 5,
    angle_range: float = 2 * math.pi / 15,
) -> np.ndarray:
    """Random free-form brush mask, bool HxW, True = stroke (the region to inpaint).

    ``max_strokes`` is exclusive (default: 0-3 strokes, so about a quarter of the masks are empty, as in
    the official generator); ``brush_width`` is in pixels of this image.
    """
    strokes = sample_brush_strokes(
        height, width, rng, max_strokes, max_vertices, brush_width, mean_angle, angle_range
    )
    return draw_brush_strokes(strokes, height, width)


# ----------------------------------------------------------------------------------------------------------
# Conventions, user masks, blending.
# ----------------------------------------------------------------------------------------------------------


def _invert(mask: Any) -> Any:
    dtype = getattr(mask, "dtype", None)
    if dtype is None:
        raise MaskError(f"expected a numpy array or torch tensor mask, got {type(mask).__name__}")
    if str(dtype) in ("bool", "torch.bool"):
        return ~mask
    if mask.numel() if hasattr(mask, "numel") else mask.size:
        lo, hi = float(mask.min()), float(mask.max())
        if lo < 0 or hi > 1:
            raise MaskError(
                f"a numeric mask must lie in [0, 1] (bool, 0/1 or soft), got values in [{lo:g}, {hi:g}]; "
                "convert 0/255 masks first (e.g. mask >= 128)"
            )
    return 1 - mask


def inpaint_to_keep(mask: Any) -> Any:
    """The model's mask channel (1 = keep) from an inpaint mask (1 = inpaint); numpy or torch, bool or [0, 1]."""
    return _invert(mask)


def keep_to_inpaint(mask: Any) -> Any:
    """An inpaint mask (1 = inpaint) from the model's mask channel (1 = keep); numpy or torch, bool or [0, 1]."""
    return _invert(mask)


def load_user_mask(
    path_or_pil: str | os.PathLike | PIL.Image.Image | np.ndarray, size: tuple[int, int] | None = None
) -> np.ndarray:
    """A user mask as bool HxW, True = inpaint (white, gray level >= 128; transparent pixels count as black).

    ``path_or_pil``: an image file, a PIL image, or a numpy array (bool, or uint8 gray/RGB). ``size``:
    ``(height, width)`` to resize to (nearest neighbour), or None to keep the mask's own size.
    """
    if isinstance(path_or_pil, np.ndarray):
        arr = path_or_pil
        if arr.dtype == bool and arr.ndim == 2:
            image = PIL.Image.fromarray(arr.astype(np.uint8) * 255)
        elif arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
            image = PIL.Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        else:
            raise MaskError(f"mask array must be bool HxW or uint8 HxW[xC], got {arr.dtype} {arr.shape}")
    elif isinstance(path_or_pil, PIL.Image.Image):
        image = path_or_pil
    else:
        path = os.fspath(path_or_pil)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mask file {path!r} does not exist")
        try:
            with PIL.Image.open(path) as opened:
                image = opened.copy()
        except (OSError, ValueError) as e:
            raise MaskError(f"mask file {path!r} is not a readable image: {e}") from e
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels are unpainted: flatten onto black so they count as "keep".
        rgba = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    gray = image.convert("L")
    if size is not None:
        height, width = size
        if gray.size != (width, height):
            gray = gray.resize((width, height), PIL.Image.NEAREST)
    return np.asarray(gray) >= 128


def blurred_blend(
    original: np.ndarray, generated: np.ndarray, inpaint_mask: np.ndarray, blur_size: int = 21
) -> np.ndarray:
    """Paste ``generated`` into ``original`` with a soft seam (official test_brushnet.py / evaluate_brushnet.py
    "blended" mode): ``b = GaussianBlur(mask, blur_size x blur_size, sigma from size)``,
    ``m = 1 - (1 - mask)(1 - b)``, ``out = original (1 - m) + generated m``.

    Pixels in the mask are exactly ``generated``; pixels farther than ``blur_size // 2`` (in either axis) from
    every mask pixel are exactly ``original``. ``blur_size`` is odd, or 0 for a hard paste. The result is
    rounded (the official code truncates with ``astype``).
    """
    original, generated, mask = np.asarray(original), np.asarray(generated), np.asarray(inpaint_mask)
    if original.dtype != np.uint8 or original.ndim != 3 or original.shape[2] != 3:
        raise MaskError(f"original must be uint8 HxWx3, got {original.dtype} {original.shape}")
    if generated.dtype != np.uint8 or generated.shape != original.shape:
        raise MaskError(
            f"generated must be uint8 of the original's shape {original.shape}, got {generated.dtype} "
            f"{generated.shape}"
        )
    if mask.shape != original.shape[:2]:
        raise MaskError(f"inpaint_mask must be HxW {original.shape[:2]}, got {mask.shape}")
    if blur_size < 0 or (blur_size and blur_size % 2 == 0):
        raise MaskError(f"blur_size must be odd (or 0 for no blur), got {blur_size}")
    hard = mask.astype(np.float32)
    if hard.size and (hard.min() < 0 or hard.max() > 1):
        raise MaskError("inpaint_mask must be bool or in [0, 1]")
    m = hard
    if blur_size > 1:
        blurred = cv2.GaussianBlur(hard, (blur_size, blur_size), 0)
        m = 1 - (1 - hard) * (1 - blurred)
    m = m[..., None]
    out = original.astype(np.float32) * (1 - m) + generated.astype(np.float32) * m
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
