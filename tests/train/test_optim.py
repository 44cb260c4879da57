"""``build_optimizer``: fused AdamW where the device has the kernel, foreach otherwise; exact resume."""

from __future__ import annotations

import logging

import pytest
import torch

from train.optim import adamw_implementation, build_optimizer


def model_and_data(seed: int = 0) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 16, generator=g) for _ in range(8)]
    return model, data


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()


def test_adamw_is_fused_on_cpu_and_foreach_elsewhere():
    model, _ = model_and_data()
    opt = build_optimizer(model.parameters(), "adamw", lr=1e-3)
    assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
    meta = torch.nn.Linear(4, 4, device="meta")
    assert adamw_implementation(list(meta.parameters())) == {"foreach": True}
    assert adamw_implementation([{"params": list(model.parameters())}]) == {"fused": True}


def test_fused_adamw_matches_the_reference_loop():
    """Same update as torch's plain for-loop AdamW (up to float rounding of the fused kernel)."""
    fused_model, data = model_and_data()
    loop_model, _ = model_and_data()
    train(fused_model, build_optimizer(fused_model.parameters(), "adamw", lr=1e-2), data)
    reference = torch.optim.AdamW(
        loop_model.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False, fused=False
    )
    train(loop_model, reference, data)
    moved = 0.0
    for a, b, start in zip(
        fused_model.parameters(), loop_model.parameters(), model_and_data()[0].parameters()
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved += float((a - start).detach().abs().max())
    assert moved > 1e-2  # it trained


def test_fused_adamw_resume_after_k_steps_is_bit_identical(tmp_path):
    """Save model + optimizer after k steps (as a checkpoint does), load both into fresh objects, continue:
    the weights equal an uninterrupted run bit for bit."""
    k = 3
    full, data = model_and_data()
    train(full, build_optimizer(full.parameters(), "adamw", lr=1e-2), data)

    first, _ = model_and_data()
    opt = build_optimizer(first.parameters(), "adamw", lr=1e-2)
    train(first, opt, data[:k])
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")

    resumed, _ = model_and_data(seed=123)  # different init: everything must come from the checkpoint
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt = build_optimizer(resumed.parameters(), "adamw", lr=1e-2)
    opt.load_state_dict(state["optimizer"])
    assert opt.defaults["fused"] is True
    train(resumed, opt, data[k:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_adamw8bit_on_cpu_says_it_is_a_memory_option(caplog):
    pytest.importorskip("bitsandbytes")
    model, _ = model_and_data()
    with caplog.at_level(logging.WARNING, logger="train.optim"):
        build_optimizer(model.parameters(), "adamw8bit")
    assert "memory option, not a speed one" in caplog.text


@pytest.mark.parametrize(
    ("precision", "clip", "fused"), [("bf16-mixed", 1.0, False), ("bf16-mixed", None, True)]
)
def test_mixed_precision_with_gradient_clipping_trains_on_foreach_adamw(
    tiny_base_sd15, precision, clip, fused
):
    """Lightning refuses to clip a fused optimizer's gradients under mixed precision (it unscales them
    itself): the module then builds foreach AdamW, and keeps the fused one when nothing is clipped."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tests.train.batches import make_batch
    from train.module import BrushNetTrainingModule

    module = BrushNetTrainingModule(str(tiny_base_sd15), optimizer="adamw")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        precision=precision,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batches = [make_batch(module.tokenizer, size=32)]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 1
    group = trainer.optimizers[0].param_groups[0]
    assert bool(group["fused"]) is fused and bool(group["foreach"]) is not fused
