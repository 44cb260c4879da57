"""Loading a base model (folder or hub id) and checking that a BrushNet branch fits it.

A hub id is resolved to a local snapshot first (the HF cache, then a download when online) and every
component is then loaded with the usual ``from_pretrained(folder, subfolder=...)``. Offline, an id that
is not cached fails at once with a message saying so, instead of transformers' minutes of retries that end
in an empty 2-token tokenizer (we also check the vocabulary size after loading).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from brushnet.errors import BrushNetError
from brushnet.typecheck import check_config_file

if TYPE_CHECKING:
    from brushnet.model import BrushNetModel

# What a base-model snapshot needs; weights of other formats/variants are skipped when downloading.
_ALLOW = ["*.json", "*.txt", "*.model", "*.safetensors"]


class BaseModelError(BrushNetError, OSError):
    """A base model (or one of its components) could not be found or loaded (an ``OSError``, as
    ``from_pretrained``'s own errors)."""


class BranchMismatchError(BrushNetError, ValueError):
    """A BrushNet branch does not fit the base UNet it is paired with."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_pretrained(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder for a base model given as a folder or a hub id; fails fast and clearly offline."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise BaseModelError(f"base model folder {str(name_or_path)!r} does not exist or is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
    except Exception as cached_error:
        if _offline():
            raise BaseModelError(
                f"{str(name_or_path)!r} is not a local folder and is not in the Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 forbids downloading it. Pass a local diffusers folder, go online with "
                "HF_HUB_OFFLINE=0 (the Makefile sets 1 unless you set it), or download it first with "
                f"`HF_HUB_OFFLINE=0 hf download {name_or_path}`."
            ) from cached_error
    try:
        return Path(
            snapshot_download(str(name_or_path), revision=revision, allow_patterns=_ALLOW, etag_timeout=10)
        )
    except Exception as e:
        raise BaseModelError(
            f"could not download base model {str(name_or_path)!r} ({type(e).__name__}: {e}). "
            "Check the id and your network, or pass a local diffusers folder."
        ) from e


def _check_tokenizer(tokenizer, where: Path) -> None:
    if len(tokenizer) <= 2:  # a real CLIP tokenizer has 49,408 tokens
        raise BaseModelError(
            f"the tokenizer at {where} has only {len(tokenizer)} tokens: it did not load (this is what "
            "transformers returns for an unreachable hub id offline)"
        )


def load_tokenizer(folder: Path, subfolder: str):
    from transformers import CLIPTokenizer

    if not (folder / subfolder).is_dir():
        raise BaseModelError(f"base model {folder} has no {subfolder}/ folder")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder=subfolder)
    _check_tokenizer(tok, folder / subfolder)
    return tok


@dataclass
class BaseComponents:
    """The frozen parts of a Stable Diffusion base model (SD 1.5 / 2.x: no ``*_2``; SDXL: both)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    path: Path | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def load_base_components(
    name_or_path: str | os.PathLike,
    *,
    variant: str | None = None,
    vae: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> BaseComponents:
    """Load VAE, tokenizer(s), text encoder(s), UNet and scheduler config of a diffusers base model.

    ``vae`` optionally names a separate VAE folder/id (e.g. SDXL's fp16-fix VAE).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = resolve_pretrained(name_or_path, revision)
    is_sdxl = (folder / "text_encoder_2").is_dir()
    kw: dict[str, Any] = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    variant_kw = {"variant": variant} if variant else {}
    vae_folder = resolve_pretrained(vae) if vae is not None else folder / "vae"
    configs = [
        (folder / "unet" / "config.json", UNet2DConditionModel),
        (vae_folder / "config.json", AutoencoderKL),
        (folder / "text_encoder" / "config.json", CLIPTextModel.config_class),
        (folder / "scheduler" / "scheduler_config.json", DDPMScheduler),
    ]
    if is_sdxl:
        configs.append((folder / "text_encoder_2" / "config.json", CLIPTextModelWithProjection.config_class))
    try:
        for config, cls in configs:  # a wrong-typed field: one line, not a traceback from deep inside
            check_config_file(config, cls)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw, **variant_kw)
        if vae is not None:
            vae_model = AutoencoderKL.from_pretrained(vae_folder, **kw)
        else:
            vae_model = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw, **variant_kw)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw, **variant_kw)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        parts = BaseComponents(
            unet=unet,
            vae=vae_model,
            text_encoder=text_encoder,
            tokenizer=load_tokenizer(folder, "tokenizer"),
            scheduler=scheduler,
            path=folder,
        )
        if is_sdxl:
            parts.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", **kw, **variant_kw
            )
            parts.tokenizer_2 = load_tokenizer(folder, "tokenizer_2")
    except (OSError, ValueError) as e:
        if isinstance(e, BaseModelError):
            raise
        raise BaseModelError(f"could not load the base model from {folder}: {e}") from e
    return parts


# Fields of the branch config that must equal the UNet's for the residuals to line up.
_MATCH_FIELDS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "flip_sin_to_cos",
    "freq_shift",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "cross_attention_dim",
)


def check_branch_matches_unet(branch, unet) -> None:
    """Raise :class:`BranchMismatchError` naming both configs and the field when they cannot be paired."""
    bcfg, ucfg = branch.config, unet.config
    problems = []
    for field in _MATCH_FIELDS:
        b, u = bcfg.get(field), ucfg.get(field)
        if isinstance(b, (list, tuple)) or isinstance(u, (list, tuple)):
            b, u = list(b) if b is not None else b, list(u) if u is not None else u
        if b != u:
            problems.append(f"{field}: branch={b!r} unet={u!r}")
    if len(bcfg.down_block_types) != len(ucfg.down_block_types):
        problems.append(
            f"number of down blocks: branch={len(bcfg.down_block_types)} unet={len(ucfg.down_block_types)}"
        )
    if problems:
        raise BranchMismatchError(
            f"BrushNet branch ({bcfg.get('_name_or_path') or 'in memory'}) does not fit the base UNet "
            f"({ucfg.get('_name_or_path') or 'in memory'}): " + "; ".join(problems)
        )


def load_brushnet(name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> BrushNetModel:
    """A BrushNet branch from a diffusers folder (``config.json`` + safetensors) or a hub id."""
    from brushnet.model import BrushNetModel  # imported on use, like diffusers above

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~")) or len(path.parts) > 2
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"BrushNet folder {str(name_or_path)!r} does not exist or is not a folder")
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"BrushNet folder {str(path)!r} has no config.json: expected a diffusers model folder "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    folder = path if looks_local else resolve_pretrained(name_or_path)
    check_config_file(folder / "config.json", BrushNetModel)
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return BrushNetModel.from_pretrained(folder, use_safetensors=True, **kw)
