"""PSNR / MSE / LPIPS on the preserved region: known answers on synthetic images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from brushnet.evaluation.evaluate import Evaluator, mean_finite
from brushnet.evaluation.metrics import LPIPSMetric, preserved_region_errors
from brushnet.evaluation.report import summarize
from brushnet.evaluation.scorers import LPIPSPaths, ModelPaths

from .evaluation_builders import box_mask, tiny_lpips_backbone

RNG = np.random.default_rng(0)
PHOTO = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
KEEP = ~box_mask(16, 16, 24, (64, 64))


def test_identical_images_give_zero_mse_and_capped_official_psnr():
    e = preserved_region_errors(PHOTO, PHOTO.copy(), KEEP)
    assert e.mse == 0 and e.mse_official == 0
    assert e.psnr == math.inf
    assert e.psnr_official == 1000.0  # official cap


def test_known_gaussian_noise_level():
    source = np.full((256, 256, 3), 128, dtype=np.uint8)
    sigma = 10.0
    noisy = np.clip(np.rint(128 + RNG.normal(0, sigma, source.shape)), 0, 255).astype(np.uint8)
    keep = np.ones((256, 256), dtype=bool)
    e = preserved_region_errors(source, noisy, keep)
    expected_mse = (sigma**2 + 1 / 12) / 255**2  # Gaussian variance + rounding to integers
    assert e.mse == pytest.approx(expected_mse, rel=0.03)
    assert e.psnr == pytest.approx(10 * math.log10(1 / expected_mse), abs=0.15)
    assert e.mse_official == pytest.approx(3 * e.mse, rel=1e-12)
    assert e.psnr - e.psnr_official == pytest.approx(10 * math.log10(3), abs=1e-9)  # 4.77 dB


def test_only_the_preserved_region_counts():
    generated = PHOTO.copy()
    generated[~KEEP] = 255 - generated[~KEEP]  # change only the inpainted region
    assert preserved_region_errors(PHOTO, generated, KEEP).mse == 0
    generated[0, 0] = generated[0, 0] ^ 0xFF  # one preserved pixel changes
    e = preserved_region_errors(PHOTO, generated, KEEP)
    diff = (PHOTO[0, 0].astype(float) - generated[0, 0]) / 255
    assert e.mse == pytest.approx((diff**2).sum() / (3 * KEEP.sum()))


def test_fully_masked_image_is_nan_and_left_out_of_means():
    e = preserved_region_errors(PHOTO, PHOTO, np.zeros((64, 64), dtype=bool))
    assert all(math.isnan(v) for v in (e.mse, e.psnr, e.mse_official, e.psnr_official))
    rows = [{"psnr": 20.0}, {"psnr": math.nan}, {"psnr": math.inf}, {"psnr": 30.0}]
    assert mean_finite([r["psnr"] for r in rows]) == 25.0
    (psnr,) = [s for s in summarize(rows, ["psnr"], {}) if s["metric"] == "psnr"]
    assert (psnr["mean"], psnr["n"], psnr["n_not_finite"]) == (25.0, 2, 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        preserved_region_errors(PHOTO, PHOTO[:32], KEEP)
    with pytest.raises(ValueError, match="keep mask"):
        preserved_region_errors(PHOTO, PHOTO, KEEP[:32])


@pytest.fixture(scope="module")
def lpips_metric(tmp_path_factory) -> LPIPSMetric:
    return LPIPSMetric("squeeze", tiny_lpips_backbone(tmp_path_factory.mktemp("lpips") / "sq.pth"))


def test_lpips_zero_for_identical_and_ignores_the_hole(lpips_metric):
    assert lpips_metric(PHOTO, PHOTO, KEEP) == 0.0
    hole_changed = PHOTO.copy()
    hole_changed[~KEEP] = 0
    assert lpips_metric(PHOTO, hole_changed, KEEP) == 0.0
    kept_changed = 255 - PHOTO
    assert lpips_metric(PHOTO, kept_changed, KEEP) > 0
    assert math.isnan(lpips_metric(PHOTO, kept_changed, np.zeros((64, 64), dtype=bool)))


def test_lpips_uses_the_backbone_file(lpips_metric, tmp_path):
    other = LPIPSMetric("squeeze", tiny_lpips_backbone(tmp_path / "other.pth", seed=1))
    a, b = PHOTO, 255 - PHOTO
    assert other(a, b, KEEP) != pytest.approx(lpips_metric(a, b, KEEP))
    weight = torch.load(tmp_path / "other.pth", weights_only=True)["features.0.weight"]
    assert torch.equal(other.model.net.slice1[0].weight, weight)


def test_lpips_missing_or_wrong_backbone(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        LPIPSMetric("squeeze", missing)
    evaluator = Evaluator.from_paths(ModelPaths(lpips=LPIPSPaths(backbone=str(missing))), only=["lpips"])
    assert "nope.pth" in evaluator.unavailable["lpips"] and "lpips" not in evaluator.columns
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth"):
        LPIPSMetric("squeeze", wrong)
