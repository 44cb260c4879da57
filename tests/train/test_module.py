"""BrushNetTrainingModule: the training step, loss targets, conditioning, checkpointing, EMA, NaN guard."""

from __future__ import annotations

import copy

import pytest
import torch

from brushnet.conditioning import sdxl_time_ids
from brushnet.model import BrushNetModel
from tests.train.batches import make_batch
from train.module import BrushNetTrainingModule, weight_dtype_for
from train.optim import build_optimizer, lr_lambda


@pytest.fixture(scope="module")
def sd15_module(tiny_base_sd15):
    return BrushNetTrainingModule(str(tiny_base_sd15), optimizer="adamw")


def fresh(module: BrushNetTrainingModule, **hparams) -> BrushNetTrainingModule:
    """A copy with a new branch (the base stays shared: it is frozen)."""
    m = copy.copy(module)  # shallow: shares the frozen models; gets its own branch below
    m._modules = dict(module._modules)
    m._modules["brushnet"] = BrushNetModel.from_unet(module.unet).float().train()
    m._modules["ema"] = None
    m.nonfinite = copy.copy(module.nonfinite)
    m._hparams = copy.deepcopy(module.hparams)
    m._hparams.update(hparams)
    return m


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train_steps(m, batch, steps: int, lr: float = 2e-3, fixed_noise: bool = True) -> list[float]:
    opt = build_optimizer(m.brushnet.parameters(), "adamw", lr=lr, weight_decay=0.0)
    losses = []
    for i in range(steps):
        loss = m.compute_loss(batch, gen(0 if fixed_noise else 1000 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_frozen_parts_and_fp32_branch(sd15_module):
    m = sd15_module
    assert all(not p.requires_grad for f in m.frozen_models() for p in f.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in m.brushnet.parameters())
    assert weight_dtype_for("bf16-mixed") == torch.bfloat16 and weight_dtype_for("16-mixed") == torch.float16
    assert weight_dtype_for("32-true") == torch.float32


def test_overfit_fixed_batch(sd15_module):
    m = fresh(sd15_module)
    batch = make_batch(m.tokenizer)
    losses = train_steps(m, batch, 30)
    assert losses[-1] < 0.3 * losses[0], losses


def test_branch_starts_neutral_reduces_loss_and_reads_the_masked_image(sd15_module):
    """At init the branch adds zeros (loss == UNet alone, exactly as the official zero convs). Trained with
    fresh noise and timesteps every step, the loss with the branch drops well below the frozen UNet alone
    on held-out noise, and the branch's residuals depend on the masked image it is given."""
    m = fresh(sd15_module)
    batch = make_batch(m.tokenizer, n=2)
    with torch.no_grad():
        assert m.compute_loss(batch, gen(5)).item() == m.compute_loss(batch, gen(5), use_branch=False).item()
    train_steps(m, batch, 40, lr=2e-3, fixed_noise=False)
    with torch.no_grad():
        evals = [
            (m.compute_loss(batch, gen(s)).item(), m.compute_loss(batch, gen(s), use_branch=False).item())
            for s in range(6)
        ]
    ours, unet_only = (sum(v) / len(v) for v in zip(*evals))
    assert ours < 0.8 * unet_only, (ours, unet_only)

    captured = []
    hook = m.brushnet.register_forward_hook(lambda mod, args, out: captured.append(out[1]))
    swapped = dict(batch, conditioning_pixel_values=batch["conditioning_pixel_values"].flip(0))
    with torch.no_grad():
        m.compute_loss(batch, gen(9))
        m.compute_loss(swapped, gen(9))
    hook.remove()
    assert not torch.allclose(captured[0], captured[1])


def test_mask_is_resized_nearest_and_vae_called_once(sd15_module):
    m = fresh(sd15_module)
    batch = make_batch(m.tokenizer)
    calls = []
    handle = m.vae.encoder.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    seen = {}
    orig = m.brushnet.forward

    def spy(sample, timestep, encoder_hidden_states, brushnet_cond, **kw):
        seen["cond"] = brushnet_cond
        return orig(sample, timestep, encoder_hidden_states, brushnet_cond, **kw)

    m.brushnet.forward = spy
    try:
        with torch.no_grad():
            m.compute_loss(batch, gen(0))
    finally:
        handle.remove()
        del m.brushnet.forward
    assert calls == [4]  # image + masked image of 2 samples in one VAE call
    mask_channel = seen["cond"][:, 4:]
    expected = batch["masks"][:, :, ::8, ::8]  # nearest picks the top-left pixel of each 8x8 cell
    assert torch.equal(mask_channel, expected)
    assert set(mask_channel.unique().tolist()) <= {0.0, 1.0}


def test_gradient_checkpointing_recomputes_unet_and_branch(sd15_module):
    """With checkpointing a UNet resnet (frozen) and a branch resnet run twice per step (forward + recompute
    in backward), without it once; the gradients are the same."""
    m = fresh(sd15_module)
    m.train()
    batch = make_batch(m.tokenizer)
    counts = {"unet": 0, "brushnet": 0}
    hooks = [
        m.unet.down_blocks[1]
        .resnets[0]
        .register_forward_pre_hook(lambda *_: counts.__setitem__("unet", counts["unet"] + 1)),
        m.brushnet.down_blocks[0]
        .resnets[0]
        .register_forward_pre_hook(lambda *_: counts.__setitem__("brushnet", counts["brushnet"] + 1)),
    ]
    torch.nn.init.normal_(m.brushnet.brushnet_down_blocks[0].weight, std=0.1)  # make UNet grads non-trivial
    grads = []
    try:
        for checkpointing in (False, True):
            for model in (m.unet, m.brushnet):
                if checkpointing:
                    model.enable_gradient_checkpointing()
                else:
                    model.disable_gradient_checkpointing()
            counts.update(unet=0, brushnet=0)
            m.brushnet.zero_grad()
            m.compute_loss(batch, gen(3)).backward()
            grads.append([p.grad.clone() for p in m.brushnet.parameters()])
            assert counts == ({"unet": 2, "brushnet": 2} if checkpointing else {"unet": 1, "brushnet": 1})
    finally:
        for h in hooks:
            h.remove()
        m.unet.disable_gradient_checkpointing()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unet_train_mode_keeps_dropout_off_and_frozen_encoders_eval(sd15_module):
    m = fresh(sd15_module)
    m.unet.down_blocks[0].resnets[0].dropout.p = 0.5  # even a UNet with dropout computes as in eval
    try:
        m.train()
        assert m.unet.training and m.brushnet.training
        assert not m.vae.training and not m.text_encoder.training
        assert all(not d.training for d in m.unet.modules() if isinstance(d, torch.nn.Dropout))
    finally:
        m.unet.down_blocks[0].resnets[0].dropout.p = 0.0


def test_v_prediction_target(tiny_base_sd2, monkeypatch):
    m = BrushNetTrainingModule(str(tiny_base_sd2), optimizer="adamw")
    assert m.parts.prediction_type == "v_prediction"
    batch = make_batch(m.tokenizer)
    velocities, targets = [], []
    get_velocity = m.noise_scheduler.get_velocity
    monkeypatch.setattr(
        m.noise_scheduler, "get_velocity", lambda *a: velocities.append(get_velocity(*a)) or velocities[-1]
    )
    mse = torch.nn.functional.mse_loss
    monkeypatch.setattr(
        "torch.nn.functional.mse_loss", lambda p, t, **kw: targets.append(t) or mse(p, t, **kw)
    )
    losses = train_steps(m, batch, 15)
    assert losses[-1] < losses[0]
    assert len(velocities) == 15 and all(torch.equal(v, t) for v, t in zip(velocities, targets))


def test_sdxl_conditioning_and_step(tiny_base_sdxl):
    m = BrushNetTrainingModule(str(tiny_base_sdxl), optimizer="adamw")
    assert m.is_sdxl
    batch = make_batch(m.tokenizer, tokenizer_2=m.tokenizer_2)
    batch["original_size"] = torch.tensor([[480, 640], [300, 200]])
    batch["crop_top_left"] = torch.tensor([[0, 16], [8, 0]])
    ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], (32, 32))
    assert ids.tolist() == [[480, 640, 0, 16, 32, 32], [300, 200, 8, 0, 32, 32]]
    seen = {}
    orig = m.unet.forward

    def spy(*args, **kw):
        seen.update(kw)
        return orig(*args, **kw)

    m.unet.forward = spy
    try:
        losses = train_steps(m, batch, 10)
    finally:
        del m.unet.forward
    assert seen["encoder_hidden_states"].shape[-1] == 64  # 32 + 32: both encoders' penultimate states
    assert seen["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert torch.equal(seen["added_cond_kwargs"]["time_ids"], ids.float())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="input_ids_2"):
        m.compute_loss({k: v for k, v in batch.items() if k != "input_ids_2"}, gen(0))


def test_min_snr_weights(sd15_module):
    m = fresh(sd15_module, min_snr_gamma=5.0)
    t = torch.tensor([1, 500, 999])
    ac = m.noise_scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(m.parts.snr_weights(m, t), expected)
    weights = m.parts.snr_weights(m, t)
    assert weights[0] < 1.0 and weights[2] == pytest.approx(1.0)  # high SNR down-weighted
    m._hparams["min_snr_gamma"] = None
    assert torch.equal(m.parts.snr_weights(m, t), torch.ones(3))


def test_ema_update_and_lr_schedules(sd15_module):
    m = fresh(sd15_module, ema_decay=0.9)
    m.ema = copy.deepcopy(m.brushnet).requires_grad_(False)
    before = [p.clone() for p in m.ema.parameters()]
    with torch.no_grad():
        for p in m.brushnet.parameters():
            p.add_(1.0)
    m.update_ema()
    for e, b in zip(m.ema.parameters(), before):
        torch.testing.assert_close(e, b + 0.1)
    cos = lr_lambda("cosine", warmup_steps=10, total_steps=110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    lin = lr_lambda("linear", 0, 100, min_lr_ratio=0.1)
    assert lin(50) == pytest.approx(0.55)
    assert lr_lambda("constant", 0)(10_000) == 1.0
    with pytest.raises(ValueError, match="max_steps"):
        lr_lambda("cosine", 10, None)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], "sgd")
