"""The BrushBench / EditBench layout and the resumable generation loop.

Layout (official ``examples/brushnet/evaluate_brushnet.py``): ``<root>/mapping_file.json`` is a dict
``id -> {"image": path relative to <root>, "inpainting_mask": RLE, "outpainting_mask": RLE, "caption": text}``;
the RLEs are row-major, 1-based ``[start, length, ...]`` over 512x512 with 1 = region to inpaint
(:func:`brushnet.masks.benchmark_rle_decode`). EditBench has no ``outpainting_mask``. Generated images are
written to ``<out>/<image>`` (the same relative path) and the masked input to ``<out>/<stem>_masked<ext>``,
as the official script does; an image whose two files exist is skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image

from brushnet import atomic
from brushnet.errors import BrushNetError
from brushnet.masks import MaskError, benchmark_rle_decode

MaskKind = Literal["inside", "outside"]
MASK_KEYS: dict[str, str] = {"inside": "inpainting_mask", "outside": "outpainting_mask"}
BENCH_SIZE = 512  # official evaluate_brushnet.py: rle2mask(mask, (512, 512)); images resized to 512x512
DEFAULT_SEED = 1234  # official evaluate_brushnet.py: torch.Generator(device).manual_seed(1234) per image
RUN_CONFIG = "generation.json"


class BenchmarkError(BrushNetError, ValueError):
    """A malformed mapping file or entry, a missing image, or a resume with different generation settings."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark entry; ``rle`` is the RLE of the chosen mask kind (1 = inpaint)."""

    id: str
    image: str
    caption: str
    rle: tuple[int, ...]

    def inpaint_mask(self) -> np.ndarray:
        """Bool 512x512, True = region to inpaint."""
        return benchmark_rle_decode(list(self.rle), BENCH_SIZE, BENCH_SIZE)


def load_mapping(path: str | os.PathLike, mask_kind: MaskKind = "inside") -> list[BenchmarkItem]:
    """Parse and validate ``mapping_file.json``; every error names the file and the entry id."""
    path = Path(path)
    if mask_kind not in MASK_KEYS:
        raise BenchmarkError(f"mask kind must be one of {sorted(MASK_KEYS)}, got {mask_kind!r}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BenchmarkError(f"mapping file {str(path)!r} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"mapping file {str(path)!r} is not valid UTF-8 JSON: {e}") from e
    if not isinstance(raw, dict) or not raw:
        raise BenchmarkError(f"mapping file {str(path)!r}: expected a non-empty JSON object id -> entry")
    return [_parse_entry(str(key), entry, MASK_KEYS[mask_kind], path) for key, entry in raw.items()]


def _parse_entry(key: str, entry: Any, mask_key: str, path: Path) -> BenchmarkItem:
    where = f"mapping file {str(path)!r}, entry {key!r}"
    if not isinstance(entry, dict):
        raise BenchmarkError(f"{where}: expected an object, got {type(entry).__name__}")
    for field in ("image", "caption"):
        if not isinstance(entry.get(field), str):
            raise BenchmarkError(f"{where}: {field!r} must be a string, got {entry.get(field)!r}")
    image = entry["image"]
    if not image or Path(image).is_absolute() or ".." in Path(image).parts:
        raise BenchmarkError(f"{where}: 'image' must be a path relative to the benchmark root, got {image!r}")
    if mask_key not in entry:
        raise BenchmarkError(f"{where}: no {mask_key!r} (have {sorted(entry)})")
    try:
        mask = benchmark_rle_decode(entry[mask_key], BENCH_SIZE, BENCH_SIZE)
    except MaskError as e:
        raise BenchmarkError(f"{where}: bad {mask_key!r}: {e}") from e
    if not mask.any():
        raise BenchmarkError(f"{where}: {mask_key!r} is empty (nothing to inpaint)")
    return BenchmarkItem(
        id=key, image=image, caption=entry["caption"], rle=tuple(int(v) for v in entry[mask_key])
    )


def load_source(root: str | os.PathLike, item: BenchmarkItem) -> np.ndarray:
    """The source image as uint8 512x512x3 RGB (resized like the official evaluation when it is not)."""
    path = Path(root) / item.image
    try:
        with PIL.Image.open(path) as im:
            rgb = im.convert("RGB")
    except FileNotFoundError as e:
        raise BenchmarkError(f"entry {item.id!r}: image {str(path)!r} does not exist") from e
    except PIL.UnidentifiedImageError as e:
        raise BenchmarkError(f"entry {item.id!r}: {str(path)!r} is not an image PIL can read") from e
    if rgb.size != (BENCH_SIZE, BENCH_SIZE):
        rgb = rgb.resize((BENCH_SIZE, BENCH_SIZE), PIL.Image.BICUBIC)
    return np.asarray(rgb).copy()


def output_paths(out_dir: str | os.PathLike, item: BenchmarkItem) -> tuple[Path, Path]:
    """``(generated, masked input)`` paths of an item (official naming: ``x.jpg`` and ``x_masked.jpg``)."""
    generated = Path(out_dir) / item.image
    return generated, generated.with_name(f"{generated.stem}_masked{generated.suffix}")


def masked_input(source: np.ndarray, item: BenchmarkItem) -> np.ndarray:
    """The source with the hole blacked out: the official ``*_masked`` image (``image * (1 - mask)``)."""
    return source * (~item.inpaint_mask())[..., None].astype(np.uint8)


def save_image_atomic(image: PIL.Image.Image, path: Path) -> None:
    """Write ``image`` atomically (format from the suffix). JPEG at PIL's default quality (75), as the
    official script's ``image.save(path)``: the compression is part of the published PSNR/MSE/LPIPS numbers."""
    try:
        atomic.save_image_atomic(image, path)
    except ValueError as e:
        raise BenchmarkError(str(e)) from e


@dataclass(frozen=True)
class GenerationSettings:
    """What determines the generated images; stored in ``<out>/generation.json`` and checked on resume."""

    base: str
    brushnet: str
    mask_kind: MaskKind = "inside"
    blended: bool = False  # official evaluate_brushnet.py: --blended is off unless given
    conditioning_scale: float = 1.0
    scheduler: str = "unipc"  # official: UniPCMultistepScheduler, 50 steps
    steps: int = 50
    guidance: float = 7.5
    seed: int = DEFAULT_SEED
    blur_size: int = 21
    masked_image_encoding: str = "official"  # one VAE sample per CFG half, as the official pipeline


@dataclass
class GenerationStats:
    generated: int = 0
    skipped: int = 0


def check_run_config(out_dir: Path, settings: GenerationSettings) -> None:
    """Record ``settings`` in ``out_dir``; refuse to resume a folder generated with other settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_CONFIG
    wanted = asdict(settings)
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{str(path)!r} is not valid JSON: {e}") from e
        diff = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if diff:
            details = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise BenchmarkError(
                f"{str(out_dir)!r} holds images generated with other settings ({details}); "
                "use another output folder or delete it"
            )
        return
    atomic.atomic_write_text(path, json.dumps(wanted, indent=2))


def generate(
    pipe: Any,
    items: Iterable[BenchmarkItem],
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: GenerationSettings,
    progress: Callable[[str], None] | None = None,
) -> GenerationStats:
    """Inpaint every item not generated yet with ``pipe`` (a :class:`brushnet.pipeline.BrushNetInpaintPipeline`)."""
    out_dir = Path(out_dir)
    check_run_config(out_dir, settings)
    stats = GenerationStats()
    for item in items:
        generated_path, masked_path = output_paths(out_dir, item)
        if generated_path.is_file() and masked_path.is_file():
            stats.skipped += 1
            continue
        if progress:
            progress(f"generating {item.id}")
        source = load_source(root, item)
        image = inpaint_item(pipe, item, source, settings)
        save_image_atomic(PIL.Image.fromarray(masked_input(source, item)), masked_path)
        save_image_atomic(image, generated_path)
        stats.generated += 1
    return stats


def inpaint_item(pipe: Any, item: BenchmarkItem, source: np.ndarray, settings: GenerationSettings):
    """One generated PIL image; the generator is re-seeded per image (official) on the CPU."""
    import torch

    generator = torch.Generator("cpu").manual_seed(settings.seed)
    # the SD3 / Flux pipelines always encode the masked image once (settings: "once"), with no such argument
    params = inspect.signature(pipe).parameters.values()
    takes = any(p.name == "masked_image_encoding" or p.kind is p.VAR_KEYWORD for p in params)
    encoding = {"masked_image_encoding": settings.masked_image_encoding} if takes else {}
    return pipe(
        item.caption,
        source,
        PIL.Image.fromarray(item.inpaint_mask().astype(np.uint8) * 255),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        brushnet_conditioning_scale=settings.conditioning_scale,
        generator=generator,
        blend=settings.blended,
        blur_size=settings.blur_size,
        **encoding,
        output_type="pil",
    ).images[0]
