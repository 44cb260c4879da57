"""BrushNetTrainingModule through Trainer.fit: non-finite steps (skip / stop, accumulation windows, the
16-mixed GradScaler) and the EMA's place relative to the checkpoint of its step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.train.batches import make_batch
from train.checkpointing import BrushNetCheckpoint
from train.module import BrushNetTrainingModule, NonFiniteLossError
from train.optim import lr_lambda


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
