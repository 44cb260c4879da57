"""Model-based metrics from local weights: CLIP similarity, ImageReward, HPS v2.1, aesthetic score, LPIPS.

Nothing is downloaded. Each metric's weights come from a path in a :class:`ModelPaths` config (YAML/JSON,
see :func:`load_model_paths`); a metric whose weights (or package) are absent is reported *unavailable*
with the path it looked for, never as zero. Formulas follow the official ``evaluate_brushnet.py``:

* CLIP similarity: torchmetrics ``CLIPScore`` with ``openai/clip-vit-large-patch14`` (transformers folder):
  ``max(100 * cos(image embedding, text embedding), 0)``.
* Aesthetic score: open_clip ViT-L/14 (OpenAI weights, QuickGELU) image embedding, L2-normalised, through the
  LAION linear head ``sa_0_4_vit_l_14_linear.pth`` (``Linear(768, 1)``).
* HPS v2.1: open_clip ViT-H/14 carrying the ``HPS_v2.1_compressed.pt`` weights; the score is the cosine of
  the normalised image and text embeddings (``hpsv2.score``), about 0.2-0.35 for real models.
* ImageReward: BLIP + MLP through the ``image-reward`` package (``ImageReward.load(checkpoint,
  med_config=...)``), used only when that package is importable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import PIL.Image


class Scorer(Protocol):
    name: str

    def __call__(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> list[float]: ...


@dataclass
class LPIPSPaths:
    net: str = "squeeze"  # official: torchmetrics LearnedPerceptualImagePatchSimilarity(net_type='squeeze')
    backbone: str | None = None  # default: torch hub cache, see metrics.default_lpips_backbone


@dataclass
class ClipPaths:
    path: str | None = None  # transformers folder of openai/clip-vit-large-patch14


@dataclass
class AestheticPaths:
    model: str = "ViT-L-14-quickgelu"  # open_clip name; OpenAI weights need QuickGELU
    weights: str | None = None  # open_clip checkpoint of the CLIP model
    head: str | None = None  # sa_0_4_vit_l_14_linear.pth
    model_config: str | None = None  # optional open_clip model config JSON (its stem is the model name)


@dataclass
class HPSPaths:
    model: str = "ViT-H-14"  # hpsv2: create_model_and_transforms('ViT-H-14', ...)
    checkpoint: str | None = None  # HPS_v2.1_compressed.pt
    model_config: str | None = None


@dataclass
class ImageRewardPaths:
    checkpoint: str | None = None  # ImageReward.pt
    med_config: str | None = None  # med_config.json


@dataclass
class ModelPaths:
    lpips: LPIPSPaths = field(default_factory=LPIPSPaths)
    clip: ClipPaths = field(default_factory=ClipPaths)
    aesthetic: AestheticPaths = field(default_factory=AestheticPaths)
    hps: HPSPaths = field(default_factory=HPSPaths)
    image_reward: ImageRewardPaths = field(default_factory=ImageRewardPaths)


def model_paths_from_dict(raw: dict[str, Any], where: str = "config") -> ModelPaths:
    """Build :class:`ModelPaths` from a nested dict; unknown sections or keys are errors naming them."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of metric sections, got {type(raw).__name__}")
    sections = {f.name: f for f in fields(ModelPaths)}
    out = ModelPaths()
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"{where}: unknown section {name!r} (known: {sorted(sections)})")
        section = getattr(out, name)
        known = {f.name for f in fields(section)}
        if not isinstance(values, dict) or set(values) - known:
            bad = sorted(set(values) - known) if isinstance(values, dict) else values
            raise ValueError(f"{where}: section {name!r} has unknown keys {bad!r} (known: {sorted(known)})")
        for key, value in values.items():
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {name}.{key} must be a string path or null, got {value!r}")
            setattr(section, key, os.path.expanduser(value) if value else value)
    return out


def load_model_paths(path: str | os.PathLike) -> ModelPaths:
    """Read a YAML (``.yaml``/``.yml``) or JSON model-paths file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ValueError(f"metrics config {str(path)!r} does not exist") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raw = json.loads(text)
    return model_paths_from_dict(raw, where=f"metrics config {str(path)!r}")


class Unavailable(Exception):
    """Raised by a builder when the metric cannot run here; the message says what was looked for."""


def _need_file(path: str | None, key: str) -> Path:
    if not path:
        raise Unavailable(f"no weights configured ({key})")
    if not Path(path).exists():
        raise Unavailable(f"weights not found at {path!r} ({key})")
    return Path(path)


def _batched(images: Sequence[PIL.Image.Image]) -> list[PIL.Image.Image]:
    return [im.convert("RGB") for im in images]


class ClipSimilarity:
    """torchmetrics CLIPScore formula on a local transformers CLIP folder."""

    name = "clip_similarity"

    def __init__(self, paths: ClipPaths, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = _need_file(paths.path, "clip.path")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device

    def __call__(self, images, prompts) -> list[float]:
        import torch

        max_len = self.model.config.text_config.max_position_embeddings
        text = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        ).to(self.device)
        pixels = self.processor.image_processor(_batched(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            img = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            txt = _features(self.model.get_text_features(**text))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (100 * cos).clamp(min=0).tolist()


def _features(out: Any):
    """Embeddings from ``get_*_features`` (a tensor, or an output object in newer transformers)."""
    return out if hasattr(out, "norm") else out.pooler_output


def _open_clip(model: str, weights: Path, model_config: str | None, device: str):
    import open_clip

    if model_config:
        config = _need_file(model_config, "model_config")
        open_clip.add_model_config(config)
        model = config.stem
    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(weights), device=device)
    return clip.eval(), preprocess, open_clip.get_tokenizer(model)


class AestheticScore:
    """LAION aesthetic predictor: linear head on the normalised open_clip image embedding."""

    name = "aesthetic_score"

    def __init__(self, paths: AestheticPaths, device: str = "cpu"):
        import torch

        weights = _need_file(paths.weights, "aesthetic.weights")
        head_path = _need_file(paths.head, "aesthetic.head")
        self.model, self.preprocess, _ = _open_clip(paths.model, weights, paths.model_config, device)
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        if set(state) != {"weight", "bias"} or state["weight"].ndim != 2 or state["weight"].shape[0] != 1:
            raise ValueError(f"{str(head_path)!r} is not a Linear(d, 1) state dict (keys {sorted(state)})")
        self.head = torch.nn.Linear(state["weight"].shape[1], 1)
        self.head.load_state_dict(state)
        self.head.eval().to(device)
        self.device = device

    def __call__(self, images, prompts=None) -> list[float]:
        import torch

        batch = torch.stack([self.preprocess(im) for im in _batched(images)]).to(self.device)
        with torch.no_grad():
            feats = self.model.encode_image(batch).float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            return self.head(feats)[:, 0].tolist()


class HPSv21:
    """Human Preference Score v2.1: cosine of normalised open_clip image and text embeddings."""

    name = "hps_v2.1"

    def __init__(self, paths: HPSPaths, device: str = "cpu"):
        checkpoint = _need_file(paths.checkpoint, "hps.checkpoint")
        self.model, self.preprocess, self.tokenizer = _open_clip(
            paths.model, checkpoint, paths.model_config, device
        )
        self.device = device

    def __call__(self, images, prompts) -> list[float]:
        import torch

        batch = torch.stack([self.preprocess(im) for im in _batched(images)]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.no_grad():
            img = self.model.encode_image(batch, normalize=True).float()
            txt = self.model.encode_text(tokens, normalize=True).float()
        return (img * txt).sum(-1).tolist()


class ImageRewardScore:
    """ImageReward v1.0 through the ``image-reward`` package (BLIP + MLP), from local files only."""

    name = "image_reward"

    def __init__(self, paths: ImageRewardPaths, device: str = "cpu"):
        checkpoint = _need_file(paths.checkpoint, "image_reward.checkpoint")
        med_config = _need_file(paths.med_config, "image_reward.med_config")
        try:
            import ImageReward as RM
        except ImportError as e:
            raise Unavailable(
                f"the 'image-reward' package is not importable ({e}); it pins timm==0.6.13 and needs "
                "fairscale and the bert-base-uncased tokenizer in the Hugging Face cache"
            ) from e
        try:
            self.model = RM.load(str(checkpoint), device=device, med_config=str(med_config))
        except OSError as e:  # BLIP's BertTokenizer.from_pretrained("bert-base-uncased") needs the HF cache
            raise Unavailable(f"ImageReward could not load offline: {e}") from e

    def __call__(self, images, prompts) -> list[float]:
        # official: imagereward_model.score(prompt, [image]) -> one reward per call
        return [float(self.model.score(p, [im])) for im, p in zip(_batched(images), prompts)]


SCORER_BUILDERS: dict[str, tuple[type, str]] = {
    "clip_similarity": (ClipSimilarity, "clip"),
    "image_reward": (ImageRewardScore, "image_reward"),
    "hps_v2.1": (HPSv21, "hps"),
    "aesthetic_score": (AestheticScore, "aesthetic"),
}


def build_scorers(
    paths: ModelPaths, device: str = "cpu", only: Sequence[str] | None = None
) -> tuple[dict[str, Scorer], dict[str, str]]:
    """``(scorers by metric name, {metric: why unavailable})``; broken (present but unreadable) weights raise."""
    scorers: dict[str, Scorer] = {}
    unavailable: dict[str, str] = {}
    for name, (cls, section) in SCORER_BUILDERS.items():
        if only is not None and name not in only:
            continue
        try:
            scorers[name] = cls(getattr(paths, section), device=device)
        except Unavailable as e:
            unavailable[name] = str(e)
    return scorers, unavailable
