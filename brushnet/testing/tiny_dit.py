"""Tiny random SD3 and Flux base models, saved as real diffusers pipeline folders (tests, demos).

Same shape family as the released bases, a few hundred thousand parameters:

* SD3: ``SD3Transformer2DModel`` (qk rms-norm and SD3.5's dual attention on the first blocks), a 16-channel
  ``AutoencoderKL`` with SD3's scaling/shift factors, CLIP-L + CLIP-G (``CLIPTextModelWithProjection``), a
  tiny T5 encoder (optional: SD3 runs with zeros in its place) and a ``FlowMatchEulerDiscreteScheduler``
  with SD3's static shift;
* Flux: ``FluxTransformer2DModel`` with the guidance embedding (dev), the same kind of VAE with Flux's
  factors, CLIP-L (``CLIPTextModel``, pooled) + T5, and the dynamically shifted scheduler of Flux.1 dev.

The T5 tokenizer is a tiny Unigram vocabulary (printable characters) built with ``tokenizers`` and saved as
``tokenizer.json``, so no sentencepiece model or download is needed.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from brushnet.testing.tiny import _text_encoder, tiny_vae, write_clip_tokenizer

# scaling_factor / shift_factor of the released VAEs (vae/config.json of stabilityai/stable-diffusion-3.5-*
# and black-forest-labs/FLUX.1-dev).
SD3_VAE_FACTORS = (1.5305, 0.0609)
FLUX_VAE_FACTORS = (0.3611, 0.1159)


def write_t5_tokenizer(path: str | os.PathLike) -> int:
    """Write a tiny T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, printable chars); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -2.0) for c in string.printable if not c.isspace()]
    pieces += [("▁" + c, -1.0) for c in string.ascii_letters + string.digits]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    t5.save_pretrained(path)
    return len(t5)


def _t5_encoder(vocab_size: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def tiny_dit_vae(factors: tuple[float, float], seed: int = 0):
    """A 4-level, 16-latent-channel VAE (x8 spatial factor, no quant convs: the SD3 / Flux VAE layout)."""
    return tiny_vae(
        seed,
        latent_channels=16,
        scaling_factor=factors[0],
        shift_factor=factors[1],
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_transformer_config() -> dict:
    """4 joint blocks, width 64 (>= the 64 outputs per token); qk rms-norm and dual attention on blocks 0-1 (the SD3.5-medium form)."""
    return dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,  # = the tiny T5's d_model
        caption_projection_dim=64,  # = the inner width (num_attention_heads * attention_head_dim)
        pooled_projection_dim=32,  # = CLIP-L pooled 16 + CLIP-G pooled 16
        pos_embed_max_size=16,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    )


def tiny_flux_transformer_config() -> dict:
    """2 double- and 4 single-stream blocks, width 64, guidance embedding (the Flux.1-dev form)."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
    )


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**tiny_sd3_transformer_config())


def tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**tiny_flux_transformer_config())


def _save_atomically(path: Path, build) -> Path:
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a base model folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        out = tmp / "base"
        build(tmp).save_pretrained(out)
        os.replace(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_sd3_base(path: str | os.PathLike, seed: int = 0, with_t5: bool = True) -> Path:
    """Save a tiny random SD3 pipeline folder; ``with_t5=False`` leaves T5 out (``text_encoder_3`` null)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    def build(tmp: Path):
        write_clip_tokenizer(tmp / "_clip")
        clip_tok = CLIPTokenizer.from_pretrained(tmp / "_clip")
        write_t5_tokenizer(tmp / "_t5")
        t5_tok = T5TokenizerFast.from_pretrained(tmp / "_t5")
        torch.manual_seed(seed)
        return StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(seed),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3 / SD3.5 scheduler_config.json
            vae=tiny_dit_vae(SD3_VAE_FACTORS, seed),
            text_encoder=_text_encoder(len(clip_tok), 16, with_projection=True),
            tokenizer=clip_tok,
            text_encoder_2=_text_encoder(len(clip_tok), 16, with_projection=True),
            tokenizer_2=clip_tok,
            text_encoder_3=_t5_encoder(len(t5_tok), 32) if with_t5 else None,
            tokenizer_3=t5_tok if with_t5 else None,
        )

    return _save_atomically(Path(path), build)


def build_tiny_flux_base(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random Flux (dev form) pipeline folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    def build(tmp: Path):
        write_clip_tokenizer(tmp / "_clip")
        clip_tok = CLIPTokenizer.from_pretrained(tmp / "_clip")
        write_t5_tokenizer(tmp / "_t5")
        t5_tok = T5TokenizerFast.from_pretrained(tmp / "_t5")
        torch.manual_seed(seed)
        # FLUX.1-dev scheduler/scheduler_config.json: resolution-dependent shift.
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=tiny_dit_vae(FLUX_VAE_FACTORS, seed),
            text_encoder=_text_encoder(len(clip_tok), 16, with_projection=False),
            tokenizer=clip_tok,
            text_encoder_2=_t5_encoder(len(t5_tok), 32),
            tokenizer_2=t5_tok,
            transformer=tiny_flux_transformer(seed),
        )

    return _save_atomically(Path(path), build)
