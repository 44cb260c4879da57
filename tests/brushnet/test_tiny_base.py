"""The shipped tiny generating base: it loads the way the trainer loads a base, its VAE reconstructs held-out
photos, its samples look like photo crops rather than noise, and the recipe still makes a model as good."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from brushnet.loading import load_base_components
from brushnet.testing.base_quality import sample_images, vae_held_out_psnr
from brushnet.testing.photos import HELD_OUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, image_statistics
from brushnet.testing.tiny_base import ASSET, pretrained_tiny_base

# Gaussian noise has roughness ~1.13 (neighbour differences of i.i.d. pixels); photo crops are far below.
MAX_SAMPLE_ROUGHNESS = 0.5
MIN_VAE_PSNR_DB = 17.5  # the shipped base: 18.8 dB on 64 held-out crops (recipe.json)


def test_shipped_base_is_small_and_records_its_recipe():
    folder = pretrained_tiny_base()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 12e6, f"{size / 1e6:.1f} MB"
    info = json.loads((folder / "recipe.json").read_text())
    assert info["recipe"]["seed"] == 0
    assert set(info["held_out_photos"]).isdisjoint(info["train_photos"])
    assert info["held_out_photos"] == list(HELD_OUT_PHOTOS) and info["train_photos"] == list(TRAIN_PHOTOS)


def test_shipped_base_loads_like_any_base():
    parts = load_base_components(pretrained_tiny_base())
    assert len(parts.tokenizer) == 49408  # the real CLIP BPE vocabulary
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
    assert parts.unet.config.in_channels == parts.vae.config.latent_channels == 4
    assert "CrossAttnDownBlock2D" in parts.unet.config.down_block_types
    assert parts.unet.dtype == parts.vae.dtype == parts.text_encoder.dtype == torch.float32


def test_vae_reconstructs_held_out_photos():
    assert vae_held_out_psnr(ASSET, n=16) > MIN_VAE_PSNR_DB


def test_samples_look_like_photo_crops_not_noise():
    samples = sample_images(ASSET, n=4, steps=10)
    stats = image_statistics(samples)
    photos = image_statistics(PhotoCrops(TRAIN_PHOTOS, 64).sample(64, np.random.default_rng(1))[0])
    noise = image_statistics(np.random.default_rng(0).normal(0, photos["std"], samples.shape).clip(-1, 1))
    assert noise["roughness"] > 1.0  # the statistic does tell noise apart
    assert stats["roughness"] < MAX_SAMPLE_ROUGHNESS, stats
    assert abs(stats["mean"] - photos["mean"]) < 0.3, (stats, photos)
    assert 0.4 * photos["std"] < stats["std"] < 2.0 * photos["std"], (stats, photos)


def test_missing_asset_names_the_rebuild_command(monkeypatch, tmp_path):
    import brushnet.testing.tiny_base as tiny_base

    monkeypatch.setattr(tiny_base, "ASSET", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="tiny_base pretrain --out"):
        tiny_base.pretrained_tiny_base()


@pytest.mark.slow
@pytest.mark.timeout(5400)  # the whole recipe: ~48 min on a busy 2-core machine (recipe.json "seconds")
def test_recipe_reproduces_a_model_of_the_same_quality(tmp_path):
    """The shipped folder's recipe, rerun from scratch, gives the same quality within noise."""
    out = tmp_path / "base"
    done = subprocess.run(
        [sys.executable, "-m", "brushnet.testing.tiny_base", "pretrain", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=5400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = json.loads((ASSET / "recipe.json").read_text())
    rebuilt = json.loads((out / "recipe.json").read_text())
    assert rebuilt["recipe"] == shipped["recipe"]
    q_new, q_old = rebuilt["quality"], shipped["quality"]
    assert q_new["vae_held_out_psnr_db"] > q_old["vae_held_out_psnr_db"] - 1.0, (q_new, q_old)
    assert q_new["unet_held_out_loss"] < 1.1 * q_old["unet_held_out_loss"], (q_new, q_old)
    assert q_new["samples"]["roughness"] < max(MAX_SAMPLE_ROUGHNESS, q_old["samples"]["roughness"] + 0.1)
    load_base_components(out)


def test_base_figure_writes_three_rows_of_upscaled_panels(tmp_path):
    out = tmp_path / "base.png"
    done = subprocess.run(
        [sys.executable, "-m", "brushnet.testing.base_figure", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    image = np.asarray(PIL.Image.open(out))
    assert image.shape == (3 * 128, 8 * 128, 3)
    crops, reconstructions = image[:128].astype(float), image[128:256].astype(float)
    # the reconstructions are of the crops above them (recognisable), not of anything else
    assert np.abs(crops - reconstructions).mean() < np.abs(crops - crops[:, ::-1]).mean()


def test_unet_held_out_loss_is_the_recorded_one_and_far_below_a_zero_prediction():
    from brushnet.testing.base_quality import unet_held_out_loss

    loss = unet_held_out_loss(ASSET)
    recorded = json.loads((ASSET / "recipe.json").read_text())["quality"]["unet_held_out_loss"]
    assert abs(loss - recorded) < 1e-3, (loss, recorded)
    assert loss < 0.5  # predicting zero noise scores 1.0 (unit-variance noise)


def test_base_figure_refuses_a_folder_that_is_not_a_base_in_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brushnet.testing.base_figure",
            str(tmp_path),
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "not a diffusers base folder" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.png").exists()
