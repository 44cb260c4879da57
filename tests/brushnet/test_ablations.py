"""The paper's ablation switches of BrushNetModel: build, zero-branch identity, positions, save/load, pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from brushnet import BrushNetInpaintPipeline, BrushNetModel
from brushnet.injection import branch_condition, unet_forward_with_brushnet
from brushnet.testing.tiny import tiny_unet

VARIANTS = {
    "half": {"injection": "half"},
    "controlnet": {"injection": "controlnet"},
    "conv": {"condition_encoder": "conv"},
    "cross_attention": {"branch_cross_attention": True},
}


def _inputs(unet, seed: int = 0, pixels: int = 64):
    g = torch.Generator().manual_seed(seed)
    c, size = unet.config.in_channels, pixels // 8  # latents of an x8 VAE, like the tiny base's
    sample = torch.randn(1, c, size, size, generator=g)
    ehs = torch.randn(1, 7, unet.config.cross_attention_dim, generator=g)
    masked_latents = torch.randn(1, c, size, size, generator=g)
    masked_pixels = torch.rand(1, 3, pixels, pixels, generator=g) * 2 - 1
    keep = (torch.rand(1, 1, pixels, pixels, generator=g) > 0.5).float()
    return sample, torch.tensor([500]), ehs, masked_latents, masked_pixels, keep


def _randomise_zero_convs(branch: BrushNetModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    convs = [*branch.brushnet_down_blocks, branch.brushnet_mid_block, *branch.brushnet_up_blocks]
    if branch.config.condition_encoder == "conv":
        convs.append(branch.conditioning_embedding.conv_out)
    with torch.no_grad():
        for conv in convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)


def _predict(unet, branch, inputs):
    sample, t, ehs, masked_latents, masked_pixels, keep = inputs
    cond = branch_condition(branch, masked_latents, masked_pixels, keep)
    down, mid, up = branch(sample, t, ehs, cond, return_dict=False)
    return unet_forward_with_brushnet(
        unet, sample, t, ehs, down, mid, up, injection=branch.config.injection
    ), (down, mid, up)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet("sd15").eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_zero_initialised_variant_leaves_the_unet_unchanged(unet, name):
    branch = BrushNetModel.from_unet(unet, **VARIANTS[name]).eval()
    inputs = _inputs(unet)
    with torch.no_grad():
        pred, _ = _predict(unet, branch, inputs)
        plain = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert torch.equal(pred, plain)


def test_half_and_controlnet_branches_have_no_decoder_and_fewer_parameters(unet):
    full = BrushNetModel.from_unet(unet)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for injection in ("half", "controlnet"):
        half = BrushNetModel.from_unet(unet, injection=injection)
        assert len(half.up_blocks) == 0 and len(half.brushnet_up_blocks) == 0
        assert half.num_residuals == (full.num_residuals[0], 1, 0)
        assert count(half) < 0.7 * count(full)
        assert not any(k.startswith("up_blocks") for k in half.state_dict())


def test_half_changes_the_encoder_path_controlnet_only_the_skips(unet):
    """A residual on the first down layer: ``half`` adds it in the encoder's forward path (the mid block sees
    it), ``controlnet`` adds it to the skip connection only (the mid block's input is the plain one)."""
    inputs = _inputs(unet)
    sample, t, ehs = inputs[:3]
    seen = {}

    def record(module, args, kwargs):
        seen["mid_in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    hook = unet.mid_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=ehs)
            plain_mid_in = seen["mid_in"]
            preds = {}
            for injection in ("half", "controlnet"):
                branch = BrushNetModel.from_unet(unet, injection=injection).eval()
                _randomise_zero_convs(branch)
                preds[injection], _ = _predict(unet, branch, inputs)
                preds[injection + "_mid_in"] = seen["mid_in"]
    finally:
        hook.remove()
    assert not torch.allclose(preds["half_mid_in"], plain_mid_in)
    assert torch.equal(preds["controlnet_mid_in"], plain_mid_in)
    assert not torch.allclose(preds["half"], preds["controlnet"])


def test_conv_encoder_reads_pixels_and_has_no_latent_input(unet):
    branch = BrushNetModel.from_unet(unet, condition_encoder="conv")
    assert branch.conv_in_condition.in_channels == unet.config.in_channels
    assert torch.equal(branch.conv_in_condition.weight, unet.conv_in.weight)
    assert branch.config.conditioning_channels == 4
    assert len(branch.config.conditioning_embedding_out_channels) == 4  # three stride-2 convs: x8
    inputs = _inputs(unet)
    cond = branch_condition(branch, *inputs[3:])
    assert cond.shape == (1, 4, 64, 64)
    _randomise_zero_convs(branch)
    down, _, _ = branch(inputs[0], inputs[1], inputs[2], cond, return_dict=False)
    other = branch_condition(branch, inputs[3], -inputs[4], inputs[5])
    down2, _, _ = branch(inputs[0], inputs[1], inputs[2], other, return_dict=False)
    assert not torch.allclose(down[0], down2[0])  # the pixels reach the first residual


def test_cross_attention_branch_reads_the_text(unet):
    branch = BrushNetModel.from_unet(unet, branch_cross_attention=True)
    assert branch.has_cross_attention and list(branch.config.down_block_types) == list(
        unet.config.down_block_types
    )
    attn_key = next(k for k in unet.state_dict() if k.startswith("down_blocks") and "attentions" in k)
    assert torch.equal(branch.state_dict()[attn_key], unet.state_dict()[attn_key])  # copied from the UNet
    _randomise_zero_convs(branch)
    sample, t, ehs, latents, pixels, keep = _inputs(unet)
    cond = branch_condition(branch, latents, pixels, keep)
    a = branch(sample, t, ehs, cond, return_dict=False)[1]
    b = branch(sample, t, ehs * 2, cond, return_dict=False)[1]
    assert not torch.allclose(a, b)
    default = BrushNetModel.from_unet(unet)
    _randomise_zero_convs(default)
    assert torch.equal(
        default(sample, t, ehs, cond, return_dict=False)[1],
        default(sample, t, ehs * 2, cond, return_dict=False)[1],
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_round_trips_and_default_folder_stays_official(unet, tmp_path, name):
    branch = BrushNetModel.from_unet(unet, **VARIANTS[name])
    _randomise_zero_convs(branch)
    branch.save_pretrained(tmp_path / name)
    cfg = json.loads((tmp_path / name / "config.json").read_text())
    loaded = BrushNetModel.from_pretrained(tmp_path / name)
    assert loaded.config.injection == branch.config.injection
    assert loaded.config.condition_encoder == branch.config.condition_encoder
    assert list(loaded.config.down_block_types) == list(branch.config.down_block_types)
    for (k, a), (k2, b) in zip(branch.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    if "injection" in VARIANTS[name] or "condition_encoder" in VARIANTS[name]:
        assert any(k in cfg for k in ("injection", "condition_encoder"))
    BrushNetModel.from_unet(unet).save_pretrained(tmp_path / "default")
    default_cfg = json.loads((tmp_path / "default" / "config.json").read_text())
    assert "injection" not in default_cfg and "condition_encoder" not in default_cfg


@pytest.mark.parametrize("name", list(VARIANTS))
def test_pipeline_inpaints_with_each_variant(tiny_base_sd15, tmp_path, name):
    unet = UNet2DConditionModel.from_pretrained(tiny_base_sd15, subfolder="unet")
    branch = BrushNetModel.from_unet(unet, **VARIANTS[name])
    _randomise_zero_convs(branch)
    branch.save_pretrained(tmp_path / "branch")
    pipe = BrushNetInpaintPipeline.from_base(tiny_base_sd15, tmp_path / "branch")
    pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out = pipe("a ball", image, mask, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    result = np.asarray(out.images[0])
    assert result.shape == (32, 32, 3)
    plain = pipe(
        "a ball",
        image,
        mask,
        num_inference_steps=2,
        brushnet_conditioning_scale=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert not np.array_equal(result, np.asarray(plain.images[0]))  # the variant's residuals act
