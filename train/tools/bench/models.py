"""Model shapes for the step benchmark: the tiny test base, a small 3-level UNet, and SD1.5 / SDXL shapes
(random init, real sizes), all inside a real :class:`~train.module.BrushNetTrainingModule`."""

from __future__ import annotations

from pathlib import Path

import torch

from brushnet.model import BrushNetModel
from brushnet.testing.tiny import build_tiny_base
from train.module import BrushNetTrainingModule

SMALL_UNET = dict(
    block_out_channels=(64, 128, 128),
    norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
)
# diffusers' UNet2DConditionModel defaults are the SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json)
# except the text width; the VAE and CLIP ViT-L/14 text tower are their released configs.
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json and its two text encoders (CLIP-L, OpenCLIP bigG)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
)


class Shape:
    def __init__(self, kind: str, size: int, batch: int, memory: str) -> None:
        self.kind, self.size, self.batch, self.memory = kind, size, batch, memory


SHAPES = {
    "tiny": Shape("sd15", 32, 2, "< 1 GiB"),
    "small": Shape("sd15", 128, 2, "< 2 GiB"),
    "sd15": Shape("sd15", 512, 1, "10-16 GiB RSS (bf16 + checkpointing + AdamW8bit: 10.1 GiB)"),
    "sdxl": Shape("sdxl", 1024, 1, "> 40 GiB: needs a large-memory machine or a GPU"),
}
FULL_ONLY = ("sd15", "sdxl")


def full_size_parts(name: str) -> dict[str, torch.nn.Module]:
    """Random UNet, VAE and text encoder(s) of the SD1.5 or SDXL shape (under ``torch.device("meta")``:
    shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    parts = {
        "unet": UNet2DConditionModel(**(SD15_UNET if name == "sd15" else SDXL_UNET)),
        "vae": AutoencoderKL(**SD_VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**vocab, **CLIP_L)),
    }
    if name == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**vocab, **CLIP_BIGG))
    return parts


def build_module(root: Path, name: str) -> BrushNetTrainingModule:
    """The training module for shape ``name``; frozen parts and branch replaced by random ones of the shape."""
    from diffusers import UNet2DConditionModel

    shape = SHAPES[name]
    base = build_tiny_base(root / name, shape.kind)
    module = BrushNetTrainingModule(str(base), optimizer="adamw")
    if name == "tiny":
        return module
    torch.manual_seed(0)
    if name == "small":
        module.unet = UNet2DConditionModel.from_config({**module.unet.config, **SMALL_UNET})
    else:
        for attr, part in full_size_parts(name).items():
            setattr(module, attr, part)
    for frozen in module.frozen_models():
        frozen.requires_grad_(False)
    scale = 2 ** (len(module.vae.config.block_out_channels) - 1)
    module.brushnet = BrushNetModel.from_unet(module.unet, vae_scale_factor=scale).float().train()
    return module


def make_batch(
    module: BrushNetTrainingModule, name: str, device: torch.device, batch_size: int | None = None
) -> dict:
    """A loader-style batch (uint8 image and keep-mask) of the shape's size (and batch, unless given), on
    ``device``."""
    shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    b, s = batch_size or shape.batch, shape.size
    ids = module.tokenizer(
        ["a photo"] * b, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    batch = {
        "pixel_values": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
        "masks": (torch.rand(b, 1, s, s, generator=g) > 0.5).to(torch.uint8),
        "input_ids": ids,
        "original_size": torch.tensor([[s, s]] * b),
        "crop_top_left": torch.zeros(b, 2, dtype=torch.long),
    }
    if module.is_sdxl:
        batch["input_ids_2"] = ids
    batch = {k: v.to(device) for k, v in batch.items()}
    batch.update(keys=["b"] * b, num_bad=torch.tensor(0))
    return batch
