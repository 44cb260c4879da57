"""Base-model loading through the user's from_pretrained path, offline guards, branch/base pairing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch

from brushnet import BrushNetModel
from brushnet.loading import (
    BaseModelError,
    BranchMismatchError,
    check_branch_matches_unet,
    load_base_components,
    load_brushnet,
    resolve_pretrained,
)
from brushnet.testing.tiny import tiny_unet
from brushnet.typecheck import ConfigTypeError


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


def _copy_with_field(src: Path, dst: Path, config: str, field: str, value) -> Path:
    """A copy of the model folder ``src`` whose ``config`` (relative path) has ``field`` set to ``value``."""
    shutil.copytree(src, dst)
    path = dst / config
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    return path


@pytest.mark.parametrize(
    ("config", "field", "value", "expected"),
    [
        ("unet/config.json", "in_channels", "four", "expected int"),
        ("unet/config.json", "block_out_channels", 32, "expected list of int"),
        ("vae/config.json", "latent_channels", [4], "expected int"),
        ("text_encoder/config.json", "hidden_size", "32", "expected int"),
        ("scheduler/scheduler_config.json", "num_train_timesteps", 1000.5, "expected int"),
    ],
)
def test_wrong_field_type_in_a_base_config_names_file_and_field(
    tmp_path, tiny_base_sd15, config, field, value, expected
):
    path = _copy_with_field(tiny_base_sd15, tmp_path / "base", config, field, value)
    with pytest.raises(BaseModelError) as err:
        load_base_components(tmp_path / "base")
    message = str(err.value)
    assert f"{path}: field {field!r} = {value!r}" in message and expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("in_channels", "four", "expected int"),
        ("layers_per_block", [1, 2], "expected int"),
        ("block_out_channels", 32, "expected list of int"),
        ("down_block_types", "DownBlock2D", "expected list of str"),
    ],
)
def test_wrong_field_type_in_a_branch_config_names_file_and_field(tmp_path, field, value, expected):
    branch = BrushNetModel.from_unet(tiny_unet())
    branch.save_pretrained(tmp_path / "good")
    path = _copy_with_field(tmp_path / "good", tmp_path / "bad", "config.json", field, value)
    with pytest.raises(ConfigTypeError) as err:
        load_brushnet(tmp_path / "bad")
    assert str(err.value) == (
        f"{path}: field {field!r} = {value!r} ({type(value).__name__}) has the wrong type for BrushNetModel: "
        f"{expected}"
    )
    assert load_brushnet(tmp_path / "good").config.in_channels == 4  # the checks pass a good folder


def test_wrong_field_type_is_one_line_from_the_console_script(tmp_path, tiny_base_sd15):
    """``brushnet inpaint`` with a branch whose config.json has ``"in_channels": "four"``: exit 2, one line."""
    branch = BrushNetModel.from_unet(tiny_unet())
    branch.save_pretrained(tmp_path / "good")
    path = _copy_with_field(tmp_path / "good", tmp_path / "bad", "config.json", "in_channels", "four")
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    PIL.Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    script = Path(sys.executable).with_name("brushnet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "brushnet.cli"]
    args = ["inpaint", "--base", str(tiny_base_sd15), "--brushnet", str(tmp_path / "bad")]
    args += ["--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "x"]
    args += ["--out", str(tmp_path / "out.png"), "--steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "config.json" in line]
    assert len(lines) == 1 and f"{path}: field 'in_channels' = 'four'" in lines[0]
    assert "Traceback" not in proc.stderr
