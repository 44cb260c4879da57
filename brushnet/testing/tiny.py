"""Tiny random Stable Diffusion base models, saved as real diffusers folders.

Used by the tests and by ``make demo``: nothing can be downloaded here, so we build a base model of the
same *shape family* as SD 1.5, SD 2.x (v-prediction, linear projection) or SDXL (two text encoders,
``text_time`` conditioning) with a few thousand parameters, ``save_pretrained`` it, and load it back
through the exact ``from_pretrained`` path a user takes with a hub id.

The tokenizer is either a tiny byte-level vocabulary written here (514 tokens, no merges) or the real
CLIP BPE vocabulary rebuilt offline from the merges file shipped inside the ``open-clip-torch`` wheel.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

BaseKind = Literal["sd15", "sd2", "sdxl"]
VocabKind = Literal["tiny", "clip"]

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode table (the fixed mapping CLIP's BPE is defined on)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_merges_from_open_clip() -> list[str]:
    """The real CLIP BPE merges (48,894 of them), read from the open-clip-torch wheel."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "vocab='clip' needs the open-clip-torch package (pip install open-clip-torch)"
        ) from e
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the header, keep 49152 - 256 - 2 merges.
    return lines[1 : 49152 - 256 - 2 + 1]


def write_clip_tokenizer(path: str | os.PathLike, vocab: VocabKind = "tiny") -> int:
    """Write ``vocab.json`` + ``merges.txt`` (+ configs) loadable by ``CLIPTokenizer``; returns vocab size."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = clip_merges_from_open_clip() if vocab == "clip" else []
    tokens += ["".join(m.split()) for m in merges]
    tokens += [_BOS, _EOS]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        tok = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"),
            str(Path(tmp) / "merges.txt"),
            pad_token=_EOS,
            model_max_length=77,
        )
        tok.save_pretrained(path)
    return len(tokens)


def _text_encoder(vocab_size: int, hidden: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def tiny_unet_config(kind: BaseKind = "sd15") -> dict:
    """A UNet2DConditionModel config of the given family, small enough for CPU tests."""
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        norm_num_groups=8,
    )
    if kind == "sd15":
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
    if kind == "sd2":
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    if kind == "sdxl":
        # cross_attention_dim = hidden(text_encoder) + hidden(text_encoder_2) = 32 + 32;
        # projection input = pooled text embeds (32) + 6 time ids * addition_time_embed_dim (8).
        return dict(
            common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    raise ValueError(f"unknown base kind {kind!r}; expected one of 'sd15', 'sd2', 'sdxl'")


def tiny_unet(kind: BaseKind = "sd15", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(kind))


def tiny_vae(seed: int = 0, latent_channels: int = 4, **config):
    """A 4-level VAE: the same x8 spatial factor and (by default) 4 latent channels as the SD VAE;
    ``config``: more ``AutoencoderKL`` arguments (e.g. the SD3 / Flux scaling and shift)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=64,
        **config,
    )


def build_tiny_base(
    path: str | os.PathLike, kind: BaseKind = "sd15", vocab: VocabKind = "tiny", seed: int = 0
) -> Path:
    """Save a tiny random base model as a diffusers pipeline folder (model_index.json + components)."""
    from diffusers import (
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a base model folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        write_clip_tokenizer(tmp / "_tok", vocab)
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "_tok")
        vocab_size = len(tokenizer)
        scheduler = DDPMScheduler(
            # SD 1.5 / SD 2 / SDXL training schedule (scheduler_config.json of the released models).
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
            prediction_type="v_prediction" if kind == "sd2" else "epsilon",
        )
        torch.manual_seed(seed)
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=tiny_vae(seed),
                text_encoder=_text_encoder(vocab_size, 32, with_projection=False),
                text_encoder_2=_text_encoder(vocab_size, 32, with_projection=True),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=tiny_unet(kind, seed),
                scheduler=scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=tiny_vae(seed),
                text_encoder=_text_encoder(vocab_size, 32, with_projection=False),
                tokenizer=tokenizer,
                unet=tiny_unet(kind, seed),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        out = tmp / "base"
        pipe.save_pretrained(out)
        os.replace(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
