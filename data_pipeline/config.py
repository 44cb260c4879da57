"""Typed configuration of the data pipeline, loaded from one YAML file under `configs/data/`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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
    dedupe: list[str] = field(default_factory=lambda: ["url", "hash"])
    shuffle: bool = True
    seed: int = 0
    rows_per_part: int = (
        100_000  # one part = one unit of work for download and label (array tasks split parts)
    )


@dataclass
class DownloadConfig:
    image_size: int = 1024  # keep_ratio: the smaller side is resized to image_size (only if bigger)
    resize_mode: str = "keep_ratio"
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
    model_type: str = "vit_h"  # vit_h | vit_l | vit_b | tiny (random, tests)
    checkpoint: str | None = None
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    min_mask_region_area: int = 0
    device: str = "auto"  # auto = cuda when present
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast on CUDA)


@dataclass
class ClassicalConfig:
    max_side: int = 384  # segment a downscaled copy; masks are upsampled to the stored image size
    scale: float = 300.0  # skimage felzenszwalb
    sigma: float = 0.8
    min_size_frac: float = 0.01  # felzenszwalb min_size as a fraction of the (downscaled) image area


@dataclass
class LabelConfig:
    labeler: str = "auto"  # auto | sam | classical (auto = sam when a checkpoint is configured)
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
    metadata: list[str] = field(default_factory=list)
    filter: FilterConfig = field(default_factory=FilterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    label: LabelConfig = field(default_factory=LabelConfig)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], where: str = "config") -> PipelineConfig:
    cfg = _build(PipelineConfig, data, where)
    if isinstance(cfg.metadata, str):
        cfg.metadata = [cfg.metadata]
    if cfg.label.labeler not in ("auto", "sam", "classical"):
        raise ConfigError(f"{where}.label.labeler: expected auto|sam|classical, got {cfg.label.labeler!r}")
    return cfg


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    return config_from_dict(data, where=str(path))
