"""Typed configuration of the data pipeline: one YAML file under `configs/data/`, read by jsonargparse from
these dataclasses (types checked, unknown keys refused); the same dataclasses give the CLI its flags
(`--filter.min_side 256`, `--label.sam.checkpoint ...`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentError, ArgumentParser


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file/key and what was expected."""


@dataclass
class Columns:
    """Metadata column names. LAION-Aesthetics v2 defaults; v1 uses `aesthetic`. None disables that column."""

    url: str = "URL"
    caption: str | None = "TEXT"
    width: str | None = "WIDTH"
    height: str | None = "HEIGHT"
    aesthetic: str | None = "AESTHETIC_SCORE"
    punsafe: str | None = "punsafe"
    pwatermark: str | None = "pwatermark"
    hash: str | None = "hash"


@dataclass
class FilterConfig:
    columns: Columns = field(default_factory=Columns)
    min_aesthetic: float | None = 6.0
    max_punsafe: float | None = 0.5  # keep rows with punsafe < max_punsafe
    max_pwatermark: float | None = 0.5  # keep rows with pwatermark < max_pwatermark
    min_side: int = (
        512  # from the metadata WIDTH/HEIGHT; rows without a size are kept (img2dataset re-checks)
    )
    max_aspect_ratio: float | None = 3.0
    dedupe: list[Literal["url", "hash"]] = field(default_factory=lambda: ["url", "hash"])
    shuffle: bool = True
    seed: int = 0
    rows_per_part: int = (
        100_000  # one part = one unit of work for download and label (array tasks split parts)
    )


@dataclass
class DownloadConfig:
    image_size: int = 1024  # keep_ratio: the smaller side is resized to image_size (only if bigger)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = (
        "keep_ratio"  # img2dataset's ResizeMode names
    )
    resize_only_if_bigger: bool = True
    min_image_size: int = 512
    max_aspect_ratio: float = 3.0
    encode_quality: int = 95
    samples_per_shard: int = 10_000
    processes_count: int = 2
    thread_count: int = 64
    timeout: int = 10
    retries: int = 0  # img2dataset's own per-URL retries
    retry_failed_rounds: int = 0  # re-run img2dataset on the `status != success` rows this many times
    user_agent_token: str = "brushnet-train"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset defaults
    )


@dataclass
class SamConfig:
    model_type: Literal["vit_h", "vit_l", "vit_b", "tiny"] = "vit_h"  # tiny: random weights (tests)
    checkpoint: str | None = None
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    min_mask_region_area: int = 0
    device: str = "auto"  # auto = cuda when present
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # autocast on CUDA


@dataclass
class ClassicalConfig:
    max_side: int = 384  # segment a downscaled copy; masks are upsampled to the stored image size
    scale: float = 300.0  # skimage felzenszwalb
    sigma: float = 0.8
    min_size_frac: float = 0.01  # felzenszwalb min_size as a fraction of the (downscaled) image area


@dataclass
class LabelConfig:
    labeler: Literal["auto", "sam", "classical"] = "auto"  # auto = sam when a checkpoint is configured
    sam: SamConfig = field(default_factory=SamConfig)
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    min_area_frac: float = 0.01
    max_area_frac: float = 0.8
    min_score: float = 0.0
    max_masks: int = 16  # keep at most K masks per image (best score first)
    drop_images_without_masks: bool = True
    batch_size: int = 1  # images per labeller call (SAM encodes a batch at once: use 4-16 on a GPU)
    samples_per_shard: int = 10_000  # official loader assumes 10,000 samples per tar


@dataclass
class PipelineConfig:
    out: str = "data/brushdata"
    # metadata parquet files, folders or globs; a single string is a list of one
    metadata: list[str] | str = field(default_factory=list)
    filter: FilterConfig = field(default_factory=FilterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.metadata, str):
            self.metadata = [self.metadata]


def _one_line(error: Exception) -> str:
    return re.sub(r"\s*\n\s*", " ", str(error)).strip()


def add_config_arguments(parser: ArgumentParser) -> None:
    """One flag per config field (`--filter.min_side`, ...); `--metadata` takes one or more paths/globs."""
    parser.add_class_arguments(PipelineConfig, skip={"metadata"})
    parser.add_argument(
        "--metadata",
        type=str,
        nargs="+",
        help="metadata parquet files, folders or globs (config `metadata:`)",
    )


def _sections(cls: type, data: Any, where: str, key: str) -> dict[str, Any]:
    """`data` with its empty sections (`filter:`) dropped; a section that is not a mapping is an error (which
    jsonargparse only reports as a TypeError when instantiating)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: {key or 'config'}: expected a mapping, got {type(data).__name__} {data!r}"
        )
    out = dict(data)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory) and f.name in out:
            if out[f.name] is None:
                del out[f.name]
            else:
                name = f"{key}.{f.name}" if key else f.name
                out[f.name] = _sections(f.default_factory, out[f.name], where, name)
    return out


def config_from_dict(data: Any, where: str = "config") -> PipelineConfig:
    """Check and build the config; ConfigError naming `where` and the key (`min_side: abc`, unknown keys)."""
    data = _sections(PipelineConfig, data, where, "")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PipelineConfig)
    try:
        init = parser.instantiate(parser.parse_object(data))
    except ArgumentError as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    return PipelineConfig(**{f.name: init[f.name] for f in dataclasses.fields(PipelineConfig)})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if nested else value
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The config of YAML file `path` (None: the built-in defaults) with `overrides` (nested keys, e.g. the
    CLI flags given) on top; errors name the file and key."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
    where = str(path) if path is not None else "config"
    if overrides and isinstance(data, dict):
        data = _merge(data, overrides)
    return config_from_dict(data, where=where)
