"""BrushNetModel: official keys/shapes/config, cloning from a UNet, residual layout, checkpoint IO."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from brushnet import BrushNetModel
from brushnet.model import BrushNetOutput
from brushnet.testing.tiny import tiny_unet, tiny_unet_config
from tests.conftest import FIXTURES

OFFICIAL = FIXTURES / "official"

# Released base UNet configs (unet/config.json of SD 1.5 and SDXL base 1.0), shape-relevant fields only.
SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _official_shapes(name: str) -> dict[str, tuple[int, ...]]:
    rows = (
        line.rstrip("\n").split("\t")
        for line in (OFFICIAL / f"official_brushnet_{name}_state_dict.tsv").open()
    )
    return {k: tuple(int(x) for x in s.strip("()").split(",") if x.strip()) for k, s in rows}


def _meta_branch_from_unet(unet_kwargs: dict) -> BrushNetModel:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kwargs)
        return BrushNetModel.from_unet(unet, load_weights_from_unet=False)


@pytest.mark.parametrize(("name", "unet_kwargs"), [("sd15", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_state_dict_keys_and_shapes_equal_official(name, unet_kwargs):
    branch = _meta_branch_from_unet(unet_kwargs)
    ours = {k: tuple(v.shape) for k, v in branch.state_dict().items()}
    official = _official_shapes(name)
    assert list(ours) == list(official)  # same keys, same order
    assert ours == official


@pytest.mark.parametrize(("name", "unet_kwargs"), [("sd15", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_config_equals_official(name, unet_kwargs):
    branch = _meta_branch_from_unet(unet_kwargs)
    official = json.loads((OFFICIAL / f"official_brushnet_{name}_config.json").read_text())
    # what config.json holds (ablation switches at their defaults are left out of it)
    ours = {k: v for k, v in json.loads(branch.to_json_string()).items() if not k.startswith("_")}
    normalise = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples -> lists)
    assert normalise(ours) == normalise(official)


def test_parameter_counts_match_official():
    # Official released branches: 618.8M (SD 1.5) and 373.3M (SDXL) parameters.
    sd15 = sum(p.numel() for p in _meta_branch_from_unet(SD15_UNET).parameters())
    sdxl = sum(p.numel() for p in _meta_branch_from_unet(SDXL_UNET).parameters())
    assert round(sd15 / 1e6, 1) == 618.8
    assert round(sdxl / 1e6, 1) == 373.3


def test_from_official_config_file_builds_same_model():
    cfg = json.loads((OFFICIAL / "official_brushnet_sd15_config.json").read_text())
    with torch.device("meta"):
        model = BrushNetModel.from_config(cfg)
    assert set(model.state_dict()) == set(_official_shapes("sd15"))


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_from_unet_copies_weights(kind):
    unet = tiny_unet(kind)
    branch = BrushNetModel.from_unet(unet)
    w = branch.conv_in_condition.weight
    assert w.shape[1] == 9
    torch.testing.assert_close(w[:, :4], unet.conv_in.weight, rtol=0, atol=0)
    torch.testing.assert_close(w[:, 4:8], unet.conv_in.weight, rtol=0, atol=0)
    assert torch.count_nonzero(w[:, 8]) == 0
    torch.testing.assert_close(branch.conv_in_condition.bias, unet.conv_in.bias, rtol=0, atol=0)
    # The bias is independent: training the branch must not touch the frozen UNet (official bug).
    with torch.no_grad():
        branch.conv_in_condition.bias.add_(1.0)
    assert not torch.equal(branch.conv_in_condition.bias, unet.conv_in.bias)
    torch.testing.assert_close(
        branch.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight
    )
    torch.testing.assert_close(
        branch.mid_block.resnets[1].conv2.weight, unet.mid_block.resnets[1].conv2.weight
    )
    torch.testing.assert_close(
        branch.up_blocks[-1].resnets[-1].norm1.weight, unet.up_blocks[-1].resnets[-1].norm1.weight
    )
    if kind == "sdxl":  # official code leaves add_embedding random; we copy it
        torch.testing.assert_close(branch.add_embedding.linear_1.weight, unet.add_embedding.linear_1.weight)
    zero_convs = [*branch.brushnet_down_blocks, branch.brushnet_mid_block, *branch.brushnet_up_blocks]
    assert all(torch.count_nonzero(p) == 0 for m in zero_convs for p in m.parameters())


def _inputs(kind: str, batch: int = 2, size: int = 8):
    cfg = tiny_unet_config(kind)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, size, size, generator=g)
    cond = torch.cat([torch.randn(batch, 4, size, size, generator=g), torch.ones(batch, 1, size, size)], 1)
    ehs = torch.randn(batch, 5, cfg["cross_attention_dim"], generator=g)
    added = None
    if kind == "sdxl":
        added = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return sample, torch.tensor([10, 500]), ehs, cond, added


def _count_forward_calls(module: torch.nn.Module, calls: list) -> None:
    """Count executions of ``module.forward`` (forward hooks do not fire during checkpoint recomputation)."""
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted


def _randomise_zero_convs(branch: BrushNetModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*branch.brushnet_down_blocks, branch.brushnet_mid_block, *branch.brushnet_up_blocks]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_residual_shapes_match_unet_layers(kind):
    unet = tiny_unet(kind)
    branch = BrushNetModel.from_unet(unet)
    sample, t, ehs, cond, added = _inputs(kind)
    down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
    # down: conv_in + per block (layers + downsampler); up: per block (layers + 1 + upsampler)
    assert [r.shape[1] for r in down] == [32, 32, 32, 32, 64, 64]
    assert [r.shape[-1] for r in down] == [8, 8, 8, 4, 4, 4]
    assert mid.shape == (2, 64, 4, 4)
    assert [r.shape[1] for r in up] == [64, 64, 64, 64, 32, 32, 32]
    assert [r.shape[-1] for r in up] == [4, 4, 4, 8, 8, 8, 8]
    assert branch.num_residuals == (len(down), 1, len(up))


def test_conditioning_scale_float_list_and_guess_mode():
    unet = tiny_unet("sd15")
    branch = BrushNetModel.from_unet(unet)
    _randomise_zero_convs(branch)
    sample, t, ehs, cond, _ = _inputs("sd15")
    with torch.no_grad():
        d1, m1, u1 = branch(sample, t, ehs, cond, return_dict=False)
        d2, m2, u2 = branch(sample, t, ehs, cond, conditioning_scale=0.5, return_dict=False)
        n = sum(branch.num_residuals)
        per_layer = [float(i) for i in range(n)]
        d3, m3, u3 = branch(sample, t, ehs, cond, conditioning_scale=per_layer, return_dict=False)
        dg, mg, ug = branch(sample, t, ehs, cond, guess_mode=True, return_dict=False)
    torch.testing.assert_close(d2[3], d1[3] * 0.5)
    torch.testing.assert_close(m2, m1 * 0.5)
    torch.testing.assert_close(d3[2], d1[2] * 2.0)
    torch.testing.assert_close(m3, m1 * len(d1))
    torch.testing.assert_close(u3[-1], u1[-1] * (n - 1))
    ramp = torch.logspace(-1, 0, n)  # official guess_mode ramp: 0.1 .. 1.0
    torch.testing.assert_close(dg[0], d1[0] * ramp[0])
    torch.testing.assert_close(ug[-1], u1[-1] * ramp[-1])
    with pytest.raises(ValueError, match="per-layer conditioning_scale needs"):
        branch(sample, t, ehs, cond, conditioning_scale=[1.0, 2.0])


def test_forward_returns_a_brushnet_output_by_default_and_the_same_tensors_as_a_tuple():
    """``return_dict=True`` (default, as diffusers' ControlNet and the official BrushNetModel): the official
    field names; ``return_dict=False``: ``(down, mid, up)``, the order every caller unpacks."""
    branch = BrushNetModel.from_unet(tiny_unet("sdxl"))
    _randomise_zero_convs(branch)
    sample, t, ehs, cond, added = _inputs("sdxl")
    with torch.no_grad():
        out = branch(sample, t, ehs, cond, added_cond_kwargs=added)
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
    assert isinstance(out, BrushNetOutput)
    assert list(out.keys()) == ["down_block_res_samples", "mid_block_res_sample", "up_block_res_samples"]
    assert len(out.down_block_res_samples) == len(down) and len(out.up_block_res_samples) == len(up)
    assert all(torch.equal(a, b) for a, b in zip(out.down_block_res_samples, down))
    assert torch.equal(out.mid_block_res_sample, mid) and mid.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(out.up_block_res_samples, up))
    assert out.to_tuple()[1] is out.mid_block_res_sample


def test_a_mistyped_keyword_argument_is_an_error():
    branch = BrushNetModel.from_unet(tiny_unet("sd15"))
    sample, t, ehs, cond, _ = _inputs("sd15")
    with pytest.raises(TypeError, match="conditioning_scal"):
        branch(sample, t, ehs, cond, conditioning_scal=0.5)


def test_sdxl_branch_requires_added_cond_kwargs():
    branch = BrushNetModel.from_unet(tiny_unet("sdxl"))
    sample, t, ehs, cond, _ = _inputs("sdxl")
    with pytest.raises(ValueError, match="text_embeds"):
        branch(sample, t, ehs, cond)


def test_save_and_load_roundtrip(tmp_path):
    branch = BrushNetModel.from_unet(tiny_unet("sdxl"))
    _randomise_zero_convs(branch)
    branch.save_pretrained(tmp_path / "branch")
    files = sorted(p.name for p in (tmp_path / "branch").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    cfg = json.loads((tmp_path / "branch" / "config.json").read_text())
    assert cfg["_class_name"] == "BrushNetModel"
    assert cfg["mid_block_type"] == "MidBlock2D"
    loaded = BrushNetModel.from_pretrained(tmp_path / "branch")
    for (k, a), (k2, b) in zip(branch.state_dict().items(), loaded.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b)


def test_unsupported_unet_config_is_refused():
    cfg = dict(tiny_unet_config("sd15"), class_embed_type="timestep")
    unet = UNet2DConditionModel(**cfg)
    with pytest.raises(ValueError, match="class_embed_type"):
        BrushNetModel.from_unet(unet)
    with pytest.raises(ValueError, match="down_block_types"):
        BrushNetModel(down_block_types=("AttnDownBlock2D",) * 4)
    with pytest.raises(ValueError, match="injection"):
        BrushNetModel(injection="sparse")


def test_gradient_checkpointing_gives_same_gradients():
    unet = tiny_unet("sd15")
    sample, t, ehs, cond, _ = _inputs("sd15")
    grads = []
    for checkpointing in (False, True):
        branch = BrushNetModel.from_unet(unet)
        _randomise_zero_convs(branch)
        if checkpointing:
            branch.enable_gradient_checkpointing()
        calls = []
        _count_forward_calls(branch.down_blocks[0].resnets[0], calls)
        down, mid, up = branch(sample, t, ehs, cond, return_dict=False)
        (sum(r.square().sum() for r in down + up) + mid.square().sum()).backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward when checkpointing
        grads.append(branch.down_blocks[0].resnets[0].conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
