"""Builders for the evaluation tests: a fake BrushBench folder and tiny random metric networks on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import skimage.data
import torch

from brushnet.masks import benchmark_rle_encode

PHOTOS = ("astronaut", "coffee", "chelsea")


def box_mask(top: int, left: int, size: int, shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def fake_benchmark(root: Path, n: int = 3) -> Path:
    """``root/images/<photo>.jpg`` (512x512, skimage photos) and ``root/mapping_file.json``; returns root."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    mapping = {}
    for i, name in enumerate(PHOTOS[:n]):
        rgb = PIL.Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((512, 512))
        rgb.save(root / "images" / f"{name}.jpg", quality=95)
        inside = box_mask(100 + 20 * i, 150, 200)
        mapping[f"{i:03d}"] = {
            "image": f"images/{name}.jpg",
            "inpainting_mask": benchmark_rle_encode(inside),
            "outpainting_mask": benchmark_rle_encode(~box_mask(128, 128, 256)),
            "caption": f"a photo of {name}",
        }
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_open_clip(folder: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    """An open_clip model config ``<name>.json`` and random weights; returns (config, weights)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def tiny_transformers_clip(folder: Path, seed: int = 0) -> Path:
    """A transformers CLIP folder (model, tokenizer, image processor) loadable by CLIPModel/CLIPProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from brushnet.testing.tiny import write_clip_tokenizer

    vocab = write_clip_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "max_position_embeddings": 77,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def tiny_lpips_backbone(path: Path, seed: int = 0) -> Path:
    """Random torchvision SqueezeNet 1.1 weights in torchvision's state-dict layout."""
    import torchvision

    torch.manual_seed(seed)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return path


def tiny_metric_paths(folder: Path) -> dict:
    """A metrics config dict (as in a YAML file) pointing at tiny random networks; ImageReward left unset."""
    folder.mkdir(parents=True, exist_ok=True)
    aes_config, aes_weights = tiny_open_clip(folder / "aes", "TinyAesCLIP", seed=1)
    hps_config, hps_weights = tiny_open_clip(folder / "hps", "TinyHPSCLIP", seed=2)
    hps_ckpt = folder / "hps" / "HPS_v2.1_compressed.pt"  # HPS checkpoints wrap the weights in "state_dict"
    torch.save({"state_dict": torch.load(hps_weights, weights_only=True)}, hps_ckpt)
    torch.manual_seed(3)
    head = folder / "aes" / "sa_0_4_tiny_linear.pth"
    torch.save(torch.nn.Linear(TINY_OPEN_CLIP["embed_dim"], 1).state_dict(), head)
    return {
        "lpips": {"net": "squeeze", "backbone": str(tiny_lpips_backbone(folder / "squeezenet1_1.pth"))},
        "clip": {"path": str(tiny_transformers_clip(folder / "clip"))},
        "aesthetic": {"model_config": str(aes_config), "weights": str(aes_weights), "head": str(head)},
        "hps": {"model_config": str(hps_config), "checkpoint": str(hps_ckpt)},
    }
