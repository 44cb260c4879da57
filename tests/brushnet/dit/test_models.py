"""DiT branches on tiny SD3 / Flux bases loaded from real diffusers folders: identity at zero init, where each
residual lands, the branch -> base block map, gradients, save/load, refusing a branch that does not fit."""

from __future__ import annotations

import pytest
import torch

from brushnet.dit import check_branch_matches_transformer, load_dit_branch
from brushnet.dit.blocks import branch_index
from brushnet.dit.family import FAMILIES
from brushnet.loading import BranchMismatchError
from tests.brushnet.dit.helpers import batch, load_transformer, predict, randomise_outputs, residuals

FAMILY_NAMES = ["sd3", "flux"]


@pytest.fixture(params=FAMILY_NAMES)
def setup(request, tiny_dit_bases):
    family = request.param
    transformer = load_transformer(tiny_dit_bases[family])
    return family, transformer, batch(family, transformer)


@pytest.mark.parametrize("branch_text", [False, True])
def test_zero_initialised_branch_is_bit_identical(setup, branch_text):
    family, transformer, b = setup
    with torch.no_grad():
        plain = predict(family, transformer, b)
        for depth in (
            2,
            transformer.config.num_layers,
        ):  # full depth copies the last (context_pre_only) block
            branch = FAMILIES[family].build_branch(transformer, num_layers=depth, branch_text=branch_text)
            assert torch.equal(plain, predict(family, transformer, b, residuals(family, branch, b)))


def test_image_blocks_compute_the_base_blocks_without_text(setup):
    """Branch block k is base block k's image stream: equal to the base block run with an empty text stream."""
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    g = torch.Generator().manual_seed(3)
    dim = transformer.inner_dim
    h = torch.randn(2, 16, dim, generator=g)
    empty = torch.zeros(2, 0, dim)
    pooled = b["text"].pooled
    with torch.no_grad():
        if family == "sd3":
            temb = transformer.time_text_embed(torch.tensor([700.0, 300.0]), pooled)
            pairs = [
                (blk(h, temb), base(h, empty, temb)[1])
                for blk, base in zip(branch.transformer_blocks, transformer.transformer_blocks)
            ]
        else:
            from brushnet.dit.latents import image_ids

            temb = transformer.time_text_embed(
                torch.tensor([700.0, 300.0]), torch.tensor([3500.0] * 2), pooled
            )
            rot = transformer.pos_embed(image_ids((8, 8)))
            pairs = [
                (blk(h, temb, rot), base(h, empty, temb, rot)[1])
                for blk, base in zip(branch.transformer_blocks, transformer.transformer_blocks)
            ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _spy(transformer):
    """Record every base block's input image tokens and raw output, and the input of ``norm_out``."""
    log = {"in": [], "out": [], "final": None}
    blocks = list(transformer.transformer_blocks) + list(
        getattr(transformer, "single_transformer_blocks", [])
    )

    def pre(module, args, kwargs):
        log["in"].append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def post(module, args, output):
        log["out"].append(output[1])

    def final(module, args):
        log["final"] = args[0]

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in blocks]
    handles += [blk.register_forward_hook(post) for blk in blocks]
    handles.append(transformer.norm_out.register_forward_pre_hook(final))
    return log, handles


def test_each_residual_lands_after_its_base_block(setup):
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    randomise_outputs(branch)
    n_base = transformer.config.num_layers + transformer.config.get("num_single_layers", 0)
    scales = [1.0 + i for i in range(n_base)]  # every residual distinct
    with torch.no_grad():
        res = residuals(family, branch, b, conditioning_scale=scales)
        flat = list(res.block_residuals) + list(getattr(res, "single_block_residuals", ()))
        log, handles = _spy(transformer)  # registered before the injection: sees the raw block outputs
        try:
            predict(family, transformer, b, res)
        finally:
            for h in handles:
                h.remove()
    assert len(flat) == len(log["out"]) == n_base
    for i in range(n_base - 1):
        assert torch.equal(log["in"][i + 1], log["out"][i] + flat[i]), f"residual {i}"
    assert torch.equal(log["final"], log["out"][-1] + flat[-1])


def test_branch_outputs_are_spread_over_base_blocks_with_per_block_scales(setup):
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    randomise_outputs(branch)
    with torch.no_grad():
        unit = residuals(family, branch, b)
        flat = list(unit.block_residuals) + list(getattr(unit, "single_block_residuals", ()))
        scales = [0.5 * (i + 1) for i in range(len(flat))]
        scaled = residuals(family, branch, b, conditioning_scale=scales)
        flat_scaled = list(scaled.block_residuals) + list(getattr(scaled, "single_block_residuals", ()))
    owners = [branch_index(i, len(flat), 2) for i in range(len(flat))]
    assert owners == sorted(owners) and set(owners) == {0, 1}
    for i, j in [(i, j) for i in range(len(flat)) for j in range(len(flat))]:
        assert torch.equal(flat[i], flat[j]) == (owners[i] == owners[j])
    for r, s, rs in zip(flat, scales, flat_scaled):
        assert torch.equal(rs, r * s)
    with pytest.raises(ValueError, match="one value per base block"):
        residuals(family, branch, b, conditioning_scale=[1.0, 2.0])


def test_branch_index_spreads_every_branch_block_evenly():
    for m, n in [(24, 6), (38, 10), (57, 5), (10, 6), (4, 4), (6, 1)]:
        owners = [branch_index(i, m, n) for i in range(m)]
        counts = [owners.count(k) for k in range(n)]
        assert owners == sorted(owners) and min(counts) >= m // n and max(counts) <= -(-m // n), (
            m,
            n,
            counts,
        )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_only_the_branch(setup, checkpointing):
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    randomise_outputs(branch)
    transformer.requires_grad_(False)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
        branch.enable_gradient_checkpointing()
    branch.train()
    pred = predict(family, transformer, b, residuals(family, branch, b))
    pred.square().mean().backward()
    assert all(p.grad is None for p in transformer.parameters())
    missing = [n for n, p in branch.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"branch parameters without gradient: {missing}"
    if checkpointing:  # same gradients as without checkpointing
        grads = {n: p.grad.clone() for n, p in branch.named_parameters()}
        branch.zero_grad(set_to_none=True)
        transformer.disable_gradient_checkpointing()
        branch.disable_gradient_checkpointing()
        predict(family, transformer, b, residuals(family, branch, b)).square().mean().backward()
        for n, p in branch.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_zero_initialised_outputs_get_the_first_gradients(setup):
    """At init only the zero linears receive gradient (everything before them is multiplied by zero)."""
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    transformer.requires_grad_(False)
    predict(family, transformer, b, residuals(family, branch, b)).square().mean().backward()
    for name, p in branch.named_parameters():
        nonzero = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert nonzero == name.startswith("brushnet_blocks."), name


def test_save_load_round_trip(setup, tmp_path):
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    randomise_outputs(branch)
    branch.save_pretrained(tmp_path / "branch")
    assert (tmp_path / "branch" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_dit_branch(tmp_path / "branch")
    assert type(loaded) is type(branch)

    def public(cfg):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if not k.startswith("_")}

    assert public(loaded.config) == public(branch.config)
    ours, theirs = branch.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        a = predict(family, transformer, b, residuals(family, branch, b))
        c = predict(family, transformer, b, residuals(family, loaded, b))
    assert torch.equal(a, c)
    check_branch_matches_transformer(loaded, transformer)


def test_mismatched_branch_is_refused_naming_both_configs(setup, tmp_path):
    family, transformer, _ = setup
    cls = type(transformer)
    other_cfg = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    other_cfg["num_layers"] += 1
    other_cfg["num_attention_heads"] = 1
    other_cfg["attention_head_dim"] *= 2
    other = cls.from_config(other_cfg)
    other.save_pretrained(tmp_path / "other")
    other = cls.from_pretrained(tmp_path / "other")
    FAMILIES[family].build_branch(transformer, num_layers=2).save_pretrained(tmp_path / "branch")
    branch = load_dit_branch(tmp_path / "branch")
    with pytest.raises(BranchMismatchError) as e:
        check_branch_matches_transformer(branch, other)
    message = str(e.value)
    assert str(tmp_path / "branch") in message and str(tmp_path / "other") in message
    assert "num_attention_heads: branch=2 base=1" in message and "base_num_layers" in message


def test_injection_refuses_the_wrong_number_of_residuals(setup):
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=1)
    with torch.no_grad():
        res = residuals(family, branch, b)
    res.block_residuals = res.block_residuals[:-1]
    with pytest.raises(ValueError, match="same depth"):
        predict(family, transformer, b, res)


def test_inpainting_bases_with_extra_input_channels_are_refused(setup):
    family, transformer, _ = setup
    cfg = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    cfg["in_channels"] = 4 * cfg["in_channels"] if family == "sd3" else 384  # Flux Fill: 384 in, 64 out
    cfg["out_channels"] = transformer.config.in_channels
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        FAMILIES[family].build_branch(type(transformer).from_config(cfg))


def test_default_depth_is_a_quarter_of_the_joint_blocks(setup):
    family, transformer, _ = setup
    branch = FAMILIES[family].build_branch(transformer)
    assert branch.config.num_layers == -(-transformer.config.num_layers // 4)


def test_bf16_frozen_base_with_fp32_branch(setup):
    """The training layout: frozen base in bf16, branch in fp32; residuals join the base stream in bf16."""
    family, transformer, b = setup
    branch = FAMILIES[family].build_branch(transformer, num_layers=2).float()
    transformer = transformer.to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        plain = predict(family, transformer, b)
        zero = predict(family, transformer, b, residuals(family, branch, b))
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, zero)
    randomise_outputs(branch)
    predict(family, transformer, b, residuals(family, branch, b)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in branch.parameters())


def test_block_class_names_cover_every_base_and_branch_block(setup):
    """``block_class_names`` are the units the trainer shards / checkpoints: no block may fall outside them."""
    family, transformer, _ = setup
    names = set(FAMILIES[family].block_class_names)
    for branch_text in (False, True):
        branch = FAMILIES[family].build_branch(transformer, num_layers=2, branch_text=branch_text)
        blocks = [
            *transformer.transformer_blocks,
            *getattr(transformer, "single_transformer_blocks", []),
            *branch.transformer_blocks,
        ]
        assert {type(b).__name__ for b in blocks} <= names


def test_a_branch_config_with_a_wrong_type_or_class_is_one_clear_error(setup, tmp_path):
    import json

    from brushnet.typecheck import ConfigTypeError

    family, transformer, _ = setup
    FAMILIES[family].build_branch(transformer, num_layers=2).save_pretrained(tmp_path / "branch")
    config = tmp_path / "branch" / "config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, "num_layers": "2"}))
    with pytest.raises(ConfigTypeError, match=r"config.json: field 'num_layers' = '2' \(str\)"):
        load_dit_branch(tmp_path / "branch")
    config.write_text(json.dumps({**raw, "_class_name": "BrushNetModel"}))
    with pytest.raises(ValueError, match="'BrushNetModel' is not a DiT branch"):
        load_dit_branch(tmp_path / "branch")


def test_base_family_is_read_from_the_base_folder(tiny_dit_bases, tmp_path):
    from brushnet.dit import base_family
    from brushnet.dit.family import family_of
    from brushnet.loading import BaseModelError

    assert base_family(tiny_dit_bases["sd3"]) == "sd3" and base_family(tiny_dit_bases["flux"]) == "flux"
    assert family_of(tiny_dit_bases["flux"]) is FAMILIES["flux"]
    (tmp_path / "unet_base" / "unet").mkdir(parents=True)
    (tmp_path / "unet_base" / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    assert base_family(tmp_path / "unet_base") == "unet"
    with pytest.raises(ValueError, match="is a unet base, not a DiT"):
        family_of(tmp_path / "unet_base")
    (tmp_path / "odd" / "transformer").mkdir(parents=True)
    (tmp_path / "odd" / "transformer" / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    with pytest.raises(BaseModelError, match="'WanTransformer3DModel' is not supported"):
        base_family(tmp_path / "odd")
