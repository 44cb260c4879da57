"""brushnet.conditioning: the trainer and the pipeline condition the UNet on exactly the same tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brushnet.conditioning import CaptionTokenizers, check_sdxl_unet_fits, token_ids
from brushnet.loading import BaseModelError, load_base_components
from tests.train.batches import make_batch
from train.module import BrushNetTrainingModule

PROMPT = "a red boat on a calm lake at dawn"


def _spy_unet_kwargs(unet) -> list[dict]:
    """Record the keyword arguments of every call of ``unet``."""
    calls: list[dict] = []
    forward = unet.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    unet.forward = spy
    return calls


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_training_and_pipeline_give_the_unet_identical_conditioning(tiny_bases, kind):
    """One prompt through the training path (the DataModule's tokenizers, the module's loss) and through
    the pipeline built from the same module: the UNet receives equal text embeddings (and SDXL's pooled
    embeddings and time ids), bit for bit."""
    base = tiny_bases[kind]
    module = BrushNetTrainingModule(str(base), optimizer="adamw")
    size = 32
    batch = make_batch(module.tokenizer, size=size, n=1)
    batch.update({k: v[None] for k, v in CaptionTokenizers.from_pretrained(str(base))(PROMPT).items()})
    calls = _spy_unet_kwargs(module.unet)
    module.compute_loss(batch, torch.Generator().manual_seed(0))
    trained = calls[-1]

    pipe = module.inference_pipeline(use_ema=False)
    assert pipe.unet is module.unet
    image = np.full((size, size, 3), 128, np.uint8)
    mask = np.zeros((size, size), bool)
    mask[8:24, 8:24] = True
    pipe(PROMPT, image, mask, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    inferred = calls[-1]

    assert torch.equal(trained["encoder_hidden_states"], inferred["encoder_hidden_states"])
    if kind == "sdxl":
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(trained["added_cond_kwargs"][key], inferred["added_cond_kwargs"][key]), key
        assert inferred["added_cond_kwargs"]["time_ids"].tolist() == [[size, size, 0, 0, size, size]]
    else:
        assert trained["added_cond_kwargs"] is None and inferred["added_cond_kwargs"] is None
    # not trivially equal: another prompt gives other embeddings
    pipe("a blue car", image, mask, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert not torch.equal(calls[-1]["encoder_hidden_states"], inferred["encoder_hidden_states"])


def test_token_ids_pad_and_truncate_to_the_context_length(tiny_base_sd15):
    tokenizers = CaptionTokenizers.from_pretrained(tiny_base_sd15)
    one = tokenizers("short")["input_ids"]
    assert one.shape == (77,) and one.dtype == torch.int64
    long_caption = "word " * 200
    both = token_ids(tokenizers.tokenizer, ["short", long_caption])
    assert both.shape == (2, 77) and torch.equal(both[0], one)
    assert both[1, -1].item() == tokenizers.tokenizer.eos_token_id  # truncated, still ends with EOS
    assert "input_ids_2" not in tokenizers("short")


def test_sdxl_tokenizers_and_loading_errors(tiny_base_sdxl, tmp_path):
    tokenizers = CaptionTokenizers.from_pretrained(tiny_base_sdxl)
    assert set(tokenizers(["a", "b"])) == {"input_ids", "input_ids_2"}
    with pytest.raises(BaseModelError, match="has no tokenizer/ folder"):
        CaptionTokenizers.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer given"):
        CaptionTokenizers.from_pretrained("")


def test_sdxl_unet_and_text_encoder_2_must_belong_together(tiny_base_sdxl):
    parts = load_base_components(tiny_base_sdxl)
    check_sdxl_unet_fits(parts.unet, parts.text_encoder_2)
    parts.text_encoder_2.config.projection_dim += 8
    with pytest.raises(ValueError, match="do not belong together") as err:
        check_sdxl_unet_fits(parts.unet, parts.text_encoder_2)
    assert f"projection_dim={parts.text_encoder_2.config.projection_dim}" in str(err.value)
