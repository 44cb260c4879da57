"""Residual injection into a stock diffusers UNet: positions, identity at zero init, gradients, no leftovers."""

from __future__ import annotations

import pytest
import torch

from brushnet import BrushNetModel, unet_forward_with_brushnet
from brushnet.injection import residual_targets
from brushnet.testing.tiny import tiny_unet
from tests.brushnet.test_model import _count_forward_calls, _inputs, _randomise_zero_convs

KINDS = ["sd15", "sd2", "sdxl"]


def _reference_forward(unet, sample, t, ehs, down, mid, up, added=None):
    """An explicit re-statement of the official BrushNet UNet forward (TencentARC/BrushNet
    unet_2d_condition.py + unet_2d_blocks.py): written out loop by loop, no hooks, so the hook-based
    injection is checked against an independent implementation of the same order of operations."""
    down, up = list(down), list(up)
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t))
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added or {})
    emb = emb + aug if aug is not None else emb
    h = unet.conv_in(sample)
    skips = (h,)
    h = h + down.pop(0)  # the first skip keeps the value before the add
    for block in unet.down_blocks:
        attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attns):
            h = resnet(h, emb)
            if attn is not None:
                h = attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
            h = h + down.pop(0)
            skips += (h,)
        if block.downsamplers is not None:
            h = block.downsamplers[0](h) + down.pop(0)
            skips += (h,)
    if getattr(unet.mid_block, "attentions", None):
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    else:
        h = unet.mid_block(h, emb)
    h = h + mid
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        attns = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attns):
            h = resnet(torch.cat([h, res[-1]], 1), emb)
            res = res[:-1]
            if attn is not None:
                h = attn(h, encoder_hidden_states=ehs, return_dict=False)[0]
            h = h + up.pop(0)
        if block.upsamplers is not None:
            h = block.upsamplers[0](h, skips[-1].shape[2:]) + up.pop(0)
    assert not down and not up
    h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
    return h


@pytest.fixture(params=KINDS)
def setup(request):
    kind = request.param
    unet = tiny_unet(kind).eval()
    branch = BrushNetModel.from_unet(unet)
    return kind, unet, branch, _inputs(kind)


def test_zero_initialised_branch_is_bit_identical(setup):
    kind, unet, branch, (sample, t, ehs, cond, added) = setup
    with torch.no_grad():
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
        plain = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        ours = unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up, added_cond_kwargs=added)
    assert torch.equal(plain, ours)


def test_matches_reference_forward(setup):
    kind, unet, branch, (sample, t, ehs, cond, added) = setup
    _randomise_zero_convs(branch)
    with torch.no_grad():
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
        assert all(r.abs().sum() > 0 for r in [*down, mid, *up])
        ours = unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up, added_cond_kwargs=added)
        ref = _reference_forward(unet, sample, t, ehs, down, mid, up, added)
        plain = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    assert (ours - ref).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the residuals do change the prediction


def test_spy_each_residual_lands_between_its_layer_and_the_next(setup):
    """Bump one residual at a time and spy on every target layer's output (the spy is registered first,
    so it sees each output before its own residual is added): residual j must leave the outputs of
    layers before it untouched and change the very next layer's output."""
    kind, unet, branch, (sample, t, ehs, cond, added) = setup
    down_t, mid_t, up_t = residual_targets(unet)
    order = [*down_t[1:], mid_t, *up_t]  # execution order of the modules whose outputs get a residual
    seen: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(
            lambda mod, a, out: seen.append((out[0] if isinstance(out, tuple) else out).clone())
        )
        for m in order
    ]
    with torch.no_grad():
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
    flat = [torch.zeros_like(r) for r in [*down, mid, *up]]
    nd = len(down)

    def run(residuals):
        seen.clear()
        with torch.no_grad():
            out = unet_forward_with_brushnet(
                unet,
                sample,
                t,
                ehs,
                residuals[:nd],
                residuals[nd],
                residuals[nd + 1 :],
                added_cond_kwargs=added,
            )
        return [*seen], out

    try:
        base, base_out = run(flat)
        assert len(base) == len(order)
        for j in range(len(flat)):
            bumped = list(flat)
            bumped[j] = torch.ones_like(flat[j])
            outs, final = run(bumped)
            # residual j (j >= 1) is added to the output of order[j - 1]; residual 0 to the first input
            assert all(torch.equal(a, b) for a, b in zip(outs[:j], base[:j])), (
                f"residual {j} landed too early"
            )
            if j < len(order):
                assert not torch.equal(outs[j], base[j]), f"residual {j} did not reach layer {j}"
            assert not torch.equal(final, base_out)
    finally:
        for h in handles:
            h.remove()


def test_lists_are_not_consumed_or_mutated(setup):
    kind, unet, branch, (sample, t, ehs, cond, added) = setup
    _randomise_zero_convs(branch)
    with torch.no_grad():
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
    down_copy, up_copy, mid_copy = [r.clone() for r in down], [r.clone() for r in up], mid.clone()
    ids = [id(r) for r in down + up]
    with torch.no_grad():
        a = unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up, added_cond_kwargs=added)
        b = unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up, added_cond_kwargs=added)
    assert torch.equal(a, b)
    assert [id(r) for r in down + up] == ids
    assert all(torch.equal(x, y) for x, y in zip(down + up + [mid], down_copy + up_copy + [mid_copy]))


def test_no_hooks_left_behind_even_on_error(setup):
    kind, unet, branch, (sample, t, ehs, cond, added) = setup
    with torch.no_grad():
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
        unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up, added_cond_kwargs=added)
        with pytest.raises(Exception):  # noqa: B017 - wrong channel count inside the UNet
            unet_forward_with_brushnet(unet, sample[:, :3], t, ehs, down, mid, up, added_cond_kwargs=added)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_wrong_number_of_residuals_is_a_clear_error(setup):
    kind, unet, branch, (sample, t, ehs, cond, added) = setup
    with torch.no_grad():
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
    with pytest.raises(ValueError, match=r"down and .* up residuals"):
        unet_forward_with_brushnet(unet, sample, t, ehs, down[:-1], mid, up, added_cond_kwargs=added)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_branch_not_frozen_unet(checkpointing):
    unet = tiny_unet("sd15")
    unet.requires_grad_(False)
    sample, t, ehs, cond, _ = _inputs("sd15")
    branch = BrushNetModel.from_unet(unet)
    _randomise_zero_convs(branch)
    calls = []
    _count_forward_calls(unet.down_blocks[1].resnets[0], calls)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers only checkpoints when module.training is True
    down, mid, up = branch(sample, t, ehs, cond, return_dict=False)
    pred = unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up)
    pred.square().mean().backward()
    assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward: checkpointing really applied
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in branch.parameters()]
    assert all(g is not None for g in grads)
    assert branch.brushnet_up_blocks[-1].weight.grad.abs().sum() > 0
    assert branch.conv_in_condition.weight.grad.abs().sum() > 0


def test_checkpointed_unet_gives_same_branch_gradients():
    sample, t, ehs, cond, _ = _inputs("sdxl")
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet("sdxl").requires_grad_(False)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        branch = BrushNetModel.from_unet(unet)
        _randomise_zero_convs(branch)
        down, mid, up = branch(sample, t, ehs, cond, added_cond_kwargs=added, return_dict=False)
        unet_forward_with_brushnet(unet, sample, t, ehs, down, mid, up, added).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in branch.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
