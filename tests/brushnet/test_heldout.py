"""brushnet.testing.heldout: held-out cases are deterministic and the scores split the hole from the kept region."""

from __future__ import annotations

import numpy as np

from brushnet.testing.heldout import (
    HeldOutCase,
    classical_fills,
    held_out_cases,
    hole_scores,
    mean_of_samples,
)


def test_held_out_cases_are_deterministic_box_holes():
    a, b = held_out_cases(n=3, size=32, seed=4), held_out_cases(n=3, size=32, seed=4)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.hole, y.hole) and x.caption == y.caption
        rows, cols = np.nonzero(x.hole)
        box = np.zeros_like(x.hole)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert np.array_equal(box, x.hole) and 0.0 < x.hole.mean() < 0.5


def test_hole_and_kept_scores_measure_their_own_region():
    cases = held_out_cases(n=2, size=32)
    exact = [c.image.copy() for c in cases]
    wrong_hole = [np.where(c.hole[..., None], 255 - c.image, c.image).astype(np.uint8) for c in cases]
    wrong_kept = [np.where(c.hole[..., None], c.image, 255 - c.image).astype(np.uint8) for c in cases]
    perfect = hole_scores(exact, cases)
    assert perfect["mse"] == 0.0 and perfect["kept_mse"] == 0.0 and perfect["psnr_db"] == 120.0
    hole_bad, kept_bad = hole_scores(wrong_hole, cases), hole_scores(wrong_kept, cases)
    assert hole_bad["mse"] > 0.01 and hole_bad["kept_mse"] == 0.0
    assert kept_bad["kept_mse"] > 0.01 and kept_bad["mse"] == 0.0
    # PSNR is of the mean MSE over the cases
    assert np.isclose(hole_bad["psnr_db"], 10 * np.log10(1 / hole_bad["mse"]))


def test_classical_fills_change_only_the_hole_and_interpolate_smooth_images():
    ramp = np.linspace(0, 255, 32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (32, 1)), np.full((32, 32), 80.0)], -1)
    hole = np.zeros((32, 32), bool)
    hole[8:20, 10:24] = True
    case = HeldOutCase(image.round().astype(np.uint8), hole, "a ramp")
    fills = classical_fills([case])
    assert set(fills) == {"mean colour", "biharmonic"}
    for name, (filled,) in fills.items():
        assert np.array_equal(filled[~hole], case.image[~hole]), name
    mean_colour = fills["mean colour"][0][hole]
    assert np.array_equal(mean_colour, np.broadcast_to(case.image[~hole].mean(0).round(), mean_colour.shape))
    # a linear image is harmonic: biharmonic interpolation restores it, the mean colour does not
    scores = {name: hole_scores(images, [case])["psnr_db"] for name, images in fills.items()}
    assert scores["biharmonic"] > 40.0 > 25.0 > scores["mean colour"], scores


def test_mean_of_samples_averages_each_case_over_the_samples():
    a = [np.full((2, 2, 3), 10, np.uint8), np.full((2, 2, 3), 200, np.uint8)]
    b = [np.full((2, 2, 3), 20, np.uint8), np.full((2, 2, 3), 100, np.uint8)]
    mean = mean_of_samples([a, b])
    assert [m.dtype for m in mean] == [np.uint8] * 2
    assert np.all(mean[0] == 15) and np.all(mean[1] == 150)
