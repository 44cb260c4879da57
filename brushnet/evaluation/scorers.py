"""Model-based metrics from local weights: CLIP similarity, ImageReward, HPS v2.1, aesthetic score, LPIPS.

Nothing is downloaded. Each metric's weights come from a path in a :class:`ModelPaths` config (YAML/JSON,
see :func:`load_model_paths`); a metric whose weights (or package) are absent is reported *unavailable*
with the path it looked for, never as zero. Formulas follow the official ``evaluate_brushnet.py``:

* CLIP similarity: torchmetrics ``CLIPScore`` with ``openai/clip-vit-large-patch14`` (transformers folder):
  ``max(100 * cos(image embedding, text embedding), 0)``; a caption longer than the text encoder's 77
  positions keeps its first 77 tokens, end-of-text token included in the cut (what CLIPScore does).
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

from brushnet.typecheck import dataclass_from_dict


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
    """Build :class:`ModelPaths` from a nested dict; unknown sections or keys and values of the wrong type
    are errors naming the key and the value (:class:`brushnet.typecheck.ConfigTypeError`)."""
    paths = dataclass_from_dict(ModelPaths, raw, where)
    for section in fields(paths):
        values = getattr(paths, section.name)
        for f in fields(values):
            if isinstance(getattr(values, f.name), str):
                setattr(values, f.name, os.path.expanduser(getattr(values, f.name)))
    return paths


def load_model_paths(path: str | os.PathLike) -> ModelPaths:
    """Read a YAML (``.yaml``/``.yml``) or JSON model-paths file (``configs/eval/metrics.yaml`` is one)."""
    import yaml

    path = Path(path)
    where = f"metrics config {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ValueError(f"{where} does not exist") from e
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        raw = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        reason = " ".join(str(e).split())  # one line: YAML errors span several
        raise ValueError(f"{where} is not valid {'YAML' if is_yaml else 'JSON'}: {reason}") from e
    return model_paths_from_dict(raw or {}, where=where)


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
        import numpy as np
        import torch

        # As torchmetrics' CLIPScore, which the official evaluate_brushnet.py calls: the processor gets uint8
        # CxHxW tensors, the captions are tokenized untruncated and cut to the first max_position_embeddings
        # tokens (so a long caption loses its end-of-text token too).
        max_len = self.model.config.text_config.max_position_embeddings
        text = self.processor.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids, attention = text["input_ids"][:, :max_len], text["attention_mask"][:, :max_len]
        tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in _batched(images)]
        pixels = self.processor.image_processor(tensors, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            img = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            txt = _features(
                self.model.get_text_features(
                    input_ids=ids.to(self.device), attention_mask=attention.to(self.device)
                )
            )
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
                f"the 'image-reward' package is not importable ({e}); it is not in the `eval` extra (see the "
                "README's Evaluation section: it needs timm==0.6.13, openai-clip and transformers 4, and "
                "the bert-base-uncased tokenizer in the Hugging Face cache)"
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
