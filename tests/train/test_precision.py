"""bf16 on a CPU without native bf16: one WARNING per process, from the training module's setup."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.train.batches import make_batch
from train import precision
from train.module import BrushNetTrainingModule

CPU = torch.device("cpu")


@pytest.fixture
def emulated_bf16(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)


def test_native_bf16_flag_is_a_bool():
    assert precision.cpu_has_native_bf16() in (True, False)


def test_warns_once_only_for_bf16_on_cpu(emulated_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="train.precision"):
        assert not precision.warn_if_emulated_bf16("32-true", CPU)
        assert not precision.warn_if_emulated_bf16("bf16-mixed", torch.device("cuda"))
        assert precision.warn_if_emulated_bf16("bf16-mixed", CPU)
        assert not precision.warn_if_emulated_bf16("bf16-true", CPU)  # once per process
    assert caplog.text.count("without native bf16") == 1


def test_no_warning_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert not precision.warn_if_emulated_bf16("bf16-mixed", CPU)


def test_trainer_setup_warns(emulated_bf16, tiny_base_sd15, caplog):
    module = BrushNetTrainingModule(str(tiny_base_sd15), optimizer="adamw")
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batch = make_batch(module.tokenizer)
    with caplog.at_level(logging.WARNING, logger="train.precision"):
        trainer.fit(module, DataLoader([batch], batch_size=None))
    assert "precision bf16-mixed on a CPU without native bf16" in caplog.text
