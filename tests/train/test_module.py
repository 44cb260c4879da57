"""BrushNetTrainingModule: the training step, loss targets, conditioning, checkpointing, EMA, NaN guard."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from brushnet.conditioning import sdxl_time_ids
from brushnet.model import BrushNetModel
from tests.train.batches import make_batch
from train.checkpointing import BrushNetCheckpoint
from train.module import BrushNetTrainingModule, NonFiniteLossError, weight_dtype_for
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


def _fit(
    m: BrushNetTrainingModule, batches: list[dict], *callbacks: L.Callback, **trainer_kwargs
) -> L.Trainer:
    """A CPU Trainer over ``batches`` (one micro-batch each), no logger, no checkpoints."""
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches) // accumulate,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def _poisoned(batch: dict) -> dict:
    return dict(batch, pixel_values=batch["pixel_values"] * float("nan"))


def test_nan_loss_skip_and_stop(tiny_base_sd15):
    m = BrushNetTrainingModule(str(tiny_base_sd15), nan_policy="skip", max_consecutive_skips=2)
    initial = [p.detach().clone() for p in m.brushnet.parameters()]
    bad = _poisoned(make_batch(m.tokenizer))
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        _fit(m, [bad] * 4)
    assert m.skipped_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(initial, m.brushnet.parameters()))

    stop = BrushNetTrainingModule(str(tiny_base_sd15), nan_policy="stop")
    good = make_batch(stop.tokenizer, start=5)
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 1 \(batch keys \['k0'.*nan_policy='stop'"
    ):
        _fit(stop, [good, bad])
    assert stop.global_step == 1 and stop.branch_is_finite()
    stop.brushnet.conv_in_condition.weight.data[0, 0, 0, 0] = float("inf")
    assert not stop.branch_is_finite()


def test_a_non_finite_micro_batch_drops_its_whole_accumulated_step(tiny_base_sd15):
    """With accumulation, a NaN micro-batch first or last in its window drops that optimizer step: the
    branch, the EMA and the LR schedule stay where they were (no update from the remaining micro-batches)."""
    m = BrushNetTrainingModule(
        str(tiny_base_sd15), learning_rate=1e-2, ema_decay=0.5, lr_scheduler="constant", lr_warmup_steps=10
    )
    initial = [p.detach().clone() for p in m.brushnet.parameters()]
    good = [make_batch(m.tokenizer, start=i) for i in range(6)]
    bad = _poisoned(good[0])
    batches = [good[0], good[1], good[2], bad, bad, good[3], good[4], good[5]]  # windows of 2
    snaps = _Snapshots()
    trainer = _fit(m, batches, snaps, accumulate_grad_batches=2)
    assert m.skipped_steps == 2 and trainer.global_step == 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # 2 real updates

    def same(i: int, j: int, what: int) -> bool:
        return all(torch.equal(a, b) for a, b in zip(snaps.seen[i][what], snaps.seen[j][what]))

    ends = [1, 3, 5, 7]  # the micro-batch that closes each window
    assert all(torch.equal(a, b) for a, b in zip(initial, snaps.seen[0][1]))  # mid-window: no update yet
    for what in (1, 2):  # live weights, EMA
        assert not same(0, 1, what)  # window 1 updated them
        assert same(1, 3, what) and same(3, 5, what)  # windows 2 and 3 (a NaN each) left them alone
        assert not same(5, 7, what)  # window 4 updated again
    assert all(torch.isfinite(p).all() for i in ends for p in snaps.seen[i][1])


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


class _Snapshots(L.Callback):
    """Branch and EMA weights as a callback sees them at the end of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        live = [p.detach().clone() for p in pl_module.brushnet.parameters()]
        ema = [p.detach().clone() for p in pl_module.ema.parameters()]
        self.seen.append((trainer.global_step, live, ema))


def test_ema_is_updated_before_the_checkpoint_of_its_step_and_not_on_skipped_steps(tiny_base_sd15, tmp_path):
    """The checkpoint saved at step k holds the EMA after k updates (a hook after the checkpoint
    callback's would save the EMA of step k-1); a skipped (non-finite) step leaves the EMA alone."""
    decay, lr, warmup = 0.5, 1e-2, 10
    m = BrushNetTrainingModule(
        str(tiny_base_sd15),
        learning_rate=lr,
        ema_decay=decay,
        lr_scheduler="constant",
        lr_warmup_steps=warmup,
    )
    initial = [p.detach().clone() for p in m.brushnet.parameters()]
    good = [make_batch(m.tokenizer, start=i) for i in range(3)]
    bad = dict(good[0], pixel_values=good[0]["pixel_values"] * float("nan"))
    batches = [good[0], good[1], bad, good[2]]
    snaps = _Snapshots()
    ckpt = BrushNetCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, export=False, filename="s{step}"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        callbacks=[ckpt, snaps],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    assert m.skipped_steps == 1 and len(snaps.seen) == len(batches)
    # the LR schedule counts the 3 real updates, not the 4 batches
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr * lr_lambda("constant", warmup)(3))

    expected, ema_at_step = initial, {}
    for i, (step, live, ema) in enumerate(snaps.seen):
        if batches[i] is bad:  # skipped: branch unchanged, EMA unchanged
            for a, b in zip(live, snaps.seen[i - 1][1]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            expected = [decay * e + (1 - decay) * p for e, p in zip(expected, live)]
        for e, x in zip(ema, expected):
            torch.testing.assert_close(e, x)
        ema_at_step[step] = expected
    saved = sorted((tmp_path / "ckpt").glob("s*.ckpt"))
    assert saved
    for path in saved:
        ckpt_data = torch.load(path, map_location="cpu", weights_only=False)
        state = {k[len("ema.") :]: v for k, v in ckpt_data["state_dict"].items() if k.startswith("ema.")}
        names = [n for n, _ in m.ema.named_parameters()]
        for name, x in zip(names, ema_at_step[ckpt_data["global_step"]]):
            torch.testing.assert_close(state[name], x)


def test_16_mixed_steps_skipped_by_the_grad_scaler_leave_branch_ema_and_lr_alone(tiny_base_sd15):
    """A huge initial loss scale overflows the fp16 gradients: the GradScaler skips those steps and backs the
    scale off until it fits. Skipped steps must not move the EMA or the LR schedule."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    m = BrushNetTrainingModule(
        str(tiny_base_sd15), learning_rate=1e-3, ema_decay=0.5, lr_scheduler="constant", lr_warmup_steps=100
    )
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=2.0**40, backoff_factor=2.0**-10
    )  # none on CPU by default
    batches = [make_batch(m.tokenizer, start=i) for i in range(6)]

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[bool, bool, float]] = []  # (branch moved, ema moved, scale after the step)
            self.before: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.before = (
                [p.detach().clone() for p in pl_module.brushnet.parameters()],
                [p.detach().clone() for p in pl_module.ema.parameters()],
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            def moved(a, b):
                return any(not torch.equal(x, y.detach()) for x, y in zip(a, b))

            live, ema = self.before
            self.rows.append(
                (
                    moved(live, pl_module.brushnet.parameters()),
                    moved(ema, pl_module.ema.parameters()),
                    scaler.get_scale(),
                )
            )

    watch = Watch()
    trainer = L.Trainer(
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        max_steps=len(batches),
        callbacks=[watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    skipped = [not branch for branch, _, _ in watch.rows]
    assert any(skipped) and not all(skipped), watch.rows  # some overflowed, later ones fit
    assert [ema for _, ema, _ in watch.rows] == [not s for s in skipped]
    real = len(skipped) - sum(skipped)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == real
