"""Base-model loading through the user's from_pretrained path, offline guards, branch/base pairing."""

from __future__ import annotations

import time

import pytest
import torch

from brushnet import BrushNetModel
from brushnet.loading import (
    BaseModelError,
    BranchMismatchError,
    check_branch_matches_unet,
    load_base_components,
    resolve_pretrained,
)
from brushnet.testing.tiny import tiny_unet


def test_loads_sd15_folder(tiny_base_sd15):
    parts = load_base_components(tiny_base_sd15)
    assert not parts.is_sdxl
    assert parts.unet.config.in_channels == 4
    assert len(parts.tokenizer) == 514
    assert parts.scheduler.config.prediction_type == "epsilon"
    assert parts.tokenizer_2 is None


def test_loads_sdxl_folder_with_separate_vae_and_dtype(tiny_base_sdxl, tiny_base_sd15):
    parts = load_base_components(tiny_base_sdxl, vae=tiny_base_sd15 / "vae", torch_dtype=torch.bfloat16)
    assert parts.is_sdxl
    assert parts.text_encoder_2.config.projection_dim == 32
    assert parts.unet.dtype == torch.bfloat16
    assert parts.vae.dtype == torch.bfloat16


def test_sd2_scheduler_is_v_prediction(tiny_base_sd2):
    assert load_base_components(tiny_base_sd2).scheduler.config.prediction_type == "v_prediction"


def test_uncached_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BaseModelError, match="not in the Hugging Face cache") as err:
        resolve_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(err.value)
    assert time.monotonic() - start < 10


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_pretrained(tmp_path / "nope")


def test_folder_without_tokenizer_is_a_clear_error(tmp_path, tiny_base_sd15):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_base_sd15, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(BaseModelError, match="tokenizer"):
        load_base_components(broken)


def test_empty_tokenizer_is_refused(tmp_path, tiny_base_sd15):
    """transformers returns a 2-token tokenizer for an unreachable id offline; we refuse it."""
    import json
    import shutil

    broken = tmp_path / "two-tokens"
    shutil.copytree(tiny_base_sd15, broken)
    (broken / "tokenizer" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (broken / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    for f in ("tokenizer.json",):
        (broken / "tokenizer" / f).unlink(missing_ok=True)
    with pytest.raises(BaseModelError, match="only 2 tokens"):
        load_base_components(broken)


def test_matching_branch_passes_and_mismatch_names_field():
    sd15, sdxl = tiny_unet("sd15"), tiny_unet("sdxl")
    check_branch_matches_unet(BrushNetModel.from_unet(sd15), sd15)
    with pytest.raises(BranchMismatchError, match="addition_embed_type") as err:
        check_branch_matches_unet(BrushNetModel.from_unet(sdxl), sd15)
    assert "branch=" in str(err.value) and "unet=" in str(err.value)
    wide = BrushNetModel.from_unet(sd15, load_weights_from_unet=False)
    wide.register_to_config(in_channels=8)
    with pytest.raises(BranchMismatchError, match="in_channels: branch=8 unet=4"):
        check_branch_matches_unet(wide, sd15)
