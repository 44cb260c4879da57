"""Shared fixtures: tiny random base models saved as real diffusers folders (built once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path

import pytest
import torch

from brushnet.testing.tiny import build_tiny_base

FIXTURES = Path(__file__).parent / "fixtures"

# One intra-op thread: on a shared 2-core machine, threads waiting on each other cost more than they gain.
torch.set_num_threads(1)


def _base(tmp_path_factory, kind: str) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp(f"base-{kind}") / kind, kind=kind)


@pytest.fixture(scope="session")
def tiny_base_sd15(tmp_path_factory) -> Path:
    return _base(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_base_sd2(tmp_path_factory) -> Path:
    return _base(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def tiny_base_sdxl(tmp_path_factory) -> Path:
    return _base(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_bases(tiny_base_sd15, tiny_base_sd2, tiny_base_sdxl) -> dict[str, Path]:
    return {"sd15": tiny_base_sd15, "sd2": tiny_base_sd2, "sdxl": tiny_base_sdxl}
