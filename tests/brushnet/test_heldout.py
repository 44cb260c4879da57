"""brushnet.testing.heldout: held-out cases are deterministic and the scores split the hole from the kept region."""

from __future__ import annotations

import numpy as np

from brushnet.testing.heldout import held_out_cases, hole_scores


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
