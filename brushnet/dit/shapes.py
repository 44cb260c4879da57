"""Released DiT base shapes and branch sizes, built on the meta device (no memory, no download).

``python -m brushnet.dit.shapes`` prints the parameter table of the README ("DiT bases").

The configs are the hub's ``transformer/config.json`` of each model (stabilityai/stable-diffusion-3.5-medium,
stabilityai/stable-diffusion-3.5-large, black-forest-labs/FLUX.1-dev), as reproduced in public loaders that
build these models without downloading them (e.g. Comfy-Org fp8 loaders); the Flux values are also the
defaults of diffusers' ``FluxTransformer2DModel`` and of black-forest-labs/flux ``FluxParams`` for flux-dev.
"""

from __future__ import annotations

import torch

SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD35_LARGE = dict(
    SD35_MEDIUM,
    num_layers=38,
    num_attention_heads=38,
    caption_projection_dim=2432,
    pos_embed_max_size=192,
    dual_attention_layers=(),
)
FLUX1_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
BASES = {
    "sd3.5-medium": ("sd3", SD35_MEDIUM),
    "sd3.5-large": ("sd3", SD35_LARGE),
    "flux.1-dev": ("flux", FLUX1_DEV),
}


def meta_transformer(name: str):
    """The base transformer of ``name`` (a key of :data:`BASES`) with meta tensors."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    family, cfg = BASES[name]
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        return cls(**cfg)


def meta_branch(transformer, num_layers: int | None = None, branch_text: bool = False):
    """The branch :meth:`from_transformer` builds, with meta tensors (weights are not copied)."""
    from brushnet.dit.family import family_of

    cls = family_of(transformer).branch_class
    with torch.device("meta"):
        return cls.from_transformer(
            transformer, num_layers=num_layers, branch_text=branch_text, load_weights_from_transformer=False
        )


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def table() -> list[dict]:
    """One row per base and branch depth: base / branch parameters (image-only and with the text stream)."""
    rows = []
    for name in BASES:
        base = meta_transformer(name)
        default = meta_branch(base).config.num_layers
        for n in sorted({default, 2, base.config.num_layers}):
            rows.append(
                dict(
                    base=name,
                    base_params=count(base),
                    base_blocks=base.config.num_layers + base.config.get("num_single_layers", 0),
                    branch_layers=n,
                    default=n == default,
                    branch_params=count(meta_branch(base, n)),
                    branch_text_params=count(meta_branch(base, n, branch_text=True)),
                )
            )
    return rows


_TEXT_STREAM = (
    "norm1_context.",
    "norm2_context.",
    "ff_context.",
    "attn.add_",
    "attn.to_add_out.",
    "attn.norm_added_",
)
# Tokens at 1024 x 1024: 64 x 64 patches of the 128 x 128 latent; text: SD3 77 CLIP + 256 T5, Flux 512 T5.
_TOKENS_1024 = {"sd3": (4096, 333), "flux": (4096, 512)}


def _linear_flops(block, tokens: int, text_tokens: int = 0) -> float:
    """2 FLOPs per matrix weight per token it sees (text-stream weights see the text tokens only)."""
    return sum(
        2 * p.numel() * (text_tokens if n.startswith(_TEXT_STREAM) else tokens)
        for n, p in block.named_parameters()
        if p.ndim == 2
    )


def compute_overhead(name: str) -> dict[str, float]:
    """Branch / base forward FLOPs at 1024 px, and the training overhead ``3 F_branch / (2 F_base)``.

    The frozen base runs forward and backward for activations only (~2 F_base); the branch forward and a full
    backward (~3 F_branch). Embeddings and the output layer are left out (negligible).
    """
    family, _ = BASES[name]
    base = meta_transformer(name)
    branch = meta_branch(base)
    image, text = _TOKENS_1024[family]
    dim = base.inner_dim
    attention = lambda seq: 4 * seq * seq * dim  # noqa: E731 - QK^T and AV
    f_base = sum(_linear_flops(b, image, text) + attention(image + text) for b in base.transformer_blocks)
    f_base += sum(
        _linear_flops(b, image + text) + attention(image + text)
        for b in getattr(base, "single_transformer_blocks", [])
    )
    f_branch = sum(_linear_flops(b, image) + attention(image) for b in branch.transformer_blocks)
    f_branch += _linear_flops(branch.brushnet_blocks, image)
    return {"inference": f_branch / f_base, "training": 3 * f_branch / (2 * f_base)}


# Text encoders (the released text_encoder*/config.json): CLIP ViT-L/14, OpenCLIP ViT-bigG/14 text tower, T5 v1.1 XXL.
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
TEXT_ENCODERS = {"sd3": ("clip_l", "clip_g", "t5_xxl"), "flux": ("clip_l", "t5_xxl")}


def text_encoder_params() -> dict[str, int]:
    """Parameter counts of the released text encoders, built on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        return {
            "clip_l": count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_L))),
            "clip_g": count(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, **CLIP_G))),
            "t5_xxl": count(T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL))),
        }


# Bytes per trainable parameter: fp32 weights + fp32 grads + optimizer state (AdamW: 2 fp32 moments;
# bitsandbytes AdamW8bit: 2 uint8 moments + one fp32 absmax per 256-value block each, as the README's
# SD 1.5 table measures).
_TRAIN_BYTES = {"AdamW": 4 + 4 + 8, "AdamW8bit": 4 + 4 + 2 + 2 * 4 / 256}


def memory_rows(ranks: tuple[int, ...] = (1, 8)) -> list[dict]:
    """Per-GPU GiB of weights, gradients and optimizer state (no activations) for the default branches.

    The frozen transformer is bf16 and sharded like the branch under FSDP2 (ranks > 1), buffers replicated; text encoders
    (bf16, replicated) are counted apart since cached text embeddings remove them from training.
    """
    text = text_encoder_params()
    rows = []
    for name, (family, _) in BASES.items():
        base = meta_transformer(name)
        branch_model = meta_branch(base)
        branch = count(branch_model)
        # SD3's positional table is a saved buffer: bf16 in the base, an fp32 copy in the branch (replicated)
        buffers = sum(b.numel() for b in base.buffers())
        branch_buffers = sum(b.numel() for b in branch_model.buffers())
        text_gib = 2 * sum(text[t] for t in TEXT_ENCODERS[family]) / 2**30
        for optimizer, per_param in _TRAIN_BYTES.items():
            for n in ranks:
                rows.append(
                    dict(
                        base=name,
                        strategy="DDP" if n == 1 else f"FSDP2 x{n}",
                        optimizer=optimizer,
                        branch_gib=(branch * per_param / n + 4 * branch_buffers) / 2**30,
                        base_gib=2 * (count(base) + buffers) / n / 2**30,
                        text_gib=text_gib,
                    )
                )
    return rows


if __name__ == "__main__":
    print("| base | base params | base blocks fed | branch blocks | branch params | % of base | with text |")
    print("|---|---|---|---|---|---|---|")
    for r in table():
        mark = " (default)" if r["default"] else ""
        print(
            f"| {r['base']} | {r['base_params'] / 1e9:.2f} B | {r['base_blocks']} | {r['branch_layers']}{mark} | "
            f"{r['branch_params'] / 1e6:.0f} M | {100 * r['branch_params'] / r['base_params']:.1f} | "
            f"{r['branch_text_params'] / 1e6:.0f} M |"
        )
    print()
    for name in BASES:
        overhead = compute_overhead(name)
        print(
            f"{name}: branch FLOPs / base FLOPs at 1024 px: inference +{100 * overhead['inference']:.0f}%, "
            f"training +{100 * overhead['training']:.0f}%"
        )
    print({k: f"{v / 1e6:.1f} M" for k, v in text_encoder_params().items()})
    print(
        "| base | strategy | optimizer | branch GiB | frozen transformer GiB | sum GiB | + text encoders GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in memory_rows():
        total = r["branch_gib"] + r["base_gib"]
        print(
            f"| {r['base']} | {r['strategy']} | {r['optimizer']} | {r['branch_gib']:.1f} | {r['base_gib']:.1f} | "
            f"{total:.1f} | {total + r['text_gib']:.1f} |"
        )
