"""SD3 / Flux BrushNet pipelines end to end on tiny base folders: a zero branch gives the stock diffusers
pipeline's result, the output keeps the input's size and pixels far from the mask, the branch is loaded from
its folder, SD3 runs without T5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brushnet.dit.family import FAMILIES, load_dit_base
from brushnet.dit.latents import pack
from brushnet.dit.pipeline_flux import BrushNetFluxInpaintPipeline
from brushnet.dit.pipeline_sd3 import BrushNetSD3InpaintPipeline
from tests.brushnet.dit.helpers import randomise_outputs

PIPELINES = {"sd3": BrushNetSD3InpaintPipeline, "flux": BrushNetFluxInpaintPipeline}
STEPS = 3


def _image_and_mask(h: int = 72, w: int = 88):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[20:44, 24:56] = 255  # white = inpaint
    return image, mask


def _pipeline(family: str, base, num_layers: int = 2, **kw):
    parts = load_dit_base(base, **kw)
    branch = FAMILIES[family].build_branch(parts["transformer"], num_layers=num_layers)
    return PIPELINES[family].from_base(base, branch, **kw), branch


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("prompts, per_prompt", [("a red cat", 1), (["a red cat", "a blue dog"], 2)])
def test_zero_branch_gives_the_stock_pipeline_latents(family, prompts, per_prompt, tiny_dit_bases):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    base = tiny_dit_bases[family]
    pipe, _ = _pipeline(family, base)
    image, mask = _image_and_mask(64, 64)
    n = per_prompt * (1 if isinstance(prompts, str) else len(prompts))
    noise = torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=per_prompt, output_type="latent")
    ours = pipe(prompts, image, mask, latents=noise, **kw).images
    if family == "sd3":
        theirs = StableDiffusion3Pipeline.from_pretrained(base)(
            prompts, height=64, width=64, latents=noise, **kw
        )
        torch.testing.assert_close(ours, theirs.images, rtol=1e-4, atol=1e-5)
    else:
        theirs = FluxPipeline.from_pretrained(base)(prompts, height=64, width=64, latents=pack(noise), **kw)
        torch.testing.assert_close(pack(ours), theirs.images, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pipeline_inpaints_the_mask_and_keeps_the_rest(family, tiny_dit_bases, tmp_path):
    pipe, branch = _pipeline(family, tiny_dit_bases[family])
    randomise_outputs(branch)
    branch.save_pretrained(tmp_path / "branch")
    pipe = PIPELINES[family].from_base(tiny_dit_bases[family], tmp_path / "branch")  # branch from its folder
    image, mask = _image_and_mask()
    g = torch.Generator().manual_seed(0)
    out = pipe("a red cat", image, mask, num_inference_steps=STEPS, generator=g, output_type="np").images
    assert out.shape == (1, *image.shape) and out.dtype == np.uint8
    far = np.ones(mask.shape, bool)
    far[20 - 11 : 44 + 11, 24 - 11 : 56 + 11] = False  # beyond blur_size // 2 of the mask
    assert np.array_equal(out[0][far], image[far])
    inside = mask > 0
    assert np.abs(out[0][inside].astype(int) - image[inside]).mean() > 10
    # the branch changes the result; scale 0 everywhere is the plain base
    g0 = torch.Generator().manual_seed(0)
    plain = pipe(
        "a red cat",
        image,
        mask,
        num_inference_steps=STEPS,
        generator=g0,
        output_type="np",
        brushnet_conditioning_scale=0.0,
    ).images
    assert not np.array_equal(plain, out)


def test_sd3_pipeline_runs_without_t5(tiny_sd3_base):
    pipe, _ = _pipeline("sd3", tiny_sd3_base, with_t5=False)
    assert pipe.text_encoder_3 is None
    image, mask = _image_and_mask(64, 64)
    out = pipe("a cat", image, mask, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 64, 64, 3)


def test_flux_without_t5_is_refused(tiny_flux_base):
    with pytest.raises(ValueError, match="SD3 bases only"):
        load_dit_base(tiny_flux_base, with_t5=False)


def test_bad_inputs_get_one_clear_error(tiny_flux_base, tiny_sd3_base):
    image, mask = _image_and_mask(64, 64)
    flux, _ = _pipeline("flux", tiny_flux_base)
    with pytest.raises(ValueError, match="negative_prompt would be ignored"):
        flux("a cat", image, mask, negative_prompt="blurry", num_inference_steps=1)
    sd3, branch = _pipeline("sd3", tiny_sd3_base)
    with pytest.raises(ValueError, match="multiples of 16"):
        sd3("a cat", image, mask, height=40, num_inference_steps=1)
    with pytest.raises(
        ValueError, match=r"brushnet_cond must be \[masked-image latent \(16 ch\), mask \(1 ch\)\]"
    ):
        branch(torch.zeros(1, 16, 8, 8), torch.zeros(1, 16, 8, 8), torch.tensor([1.0]), torch.zeros(1, 32))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_trainer_tokens_and_pipeline_prompts_give_the_same_conditioning(family, tiny_dit_bases):
    """Tokenized in a data worker (one caption at a time, stacked) or encoded by the pipeline: same tensors."""
    from brushnet.dit.text import DiTTokenizers, encode_tokens

    parts = load_dit_base(tiny_dit_bases[family])
    tokenizers = DiTTokenizers(family, parts)
    captions = ["a red cat", "a blue dog on a sofa"]
    tokens = [tokenizers(c) for c in captions]
    batch = {k: torch.stack([t[k] for t in tokens]) for k in tokens[0]}
    assert set(batch) == (
        {"input_ids", "input_ids_2", "input_ids_3"} if family == "sd3" else {"input_ids", "input_ids_2"}
    )
    trained = encode_tokens(family, parts, batch)
    inferred = FAMILIES[family].encode_text(parts, captions)
    assert torch.equal(trained.embeds, inferred.embeds) and torch.equal(trained.pooled, inferred.pooled)
    length = {"sd3": 77 + 256, "flux": 512}[family]
    assert trained.embeds.shape[:2] == (2, length)
