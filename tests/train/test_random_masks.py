"""``data.random_mask_prob``: the fraction of training masks drawn by the brush generator instead of taken
from the sample's segmentation masks, measured over many samples through the DataModule."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.data_builders import object_masks, tokenizer_folder, write_shards
from train.data import BrushDataModule
from train.data.transforms import normalize_batch

RES = 160  # no resize or crop, and larger than the official 128 px brush strokes
N = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-masks")
    shards = write_shards(root / "shards", [N], height=RES, width=RES, num_masks=2)
    return [str(p) for p in shards], str(tokenizer_folder(root / "tok"))


def brush_fraction(data, p: float) -> float:
    shards, tok = data
    dm = BrushDataModule(
        train_shards=shards,
        tokenizer=tok,
        resolution=RES,
        batch_size=20,
        num_workers=0,
        random_mask_prob=p,
        morph_prob=0.0,  # the mask is then exactly a segmentation mask or a brush mask
        invert_prob=0.0,
    )
    brush = 0
    for batch in dm.train_dataloader_for(0, 1):
        batch = normalize_batch(batch)
        for key, keep in zip(batch["keys"], batch["masks"][:, 0]):
            inpaint = keep < 0.5
            objects = [torch.from_numpy(m) for m in object_masks(int(key[1:]), RES, RES, 2)]
            brush += not any(torch.equal(inpaint, obj) for obj in objects)
    return brush / N


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_fraction_of_brush_masks_follows_random_mask_prob(data, p):
    tolerance = 4 * math.sqrt(p * (1 - p) / N)  # 4 standard deviations of a binomial fraction
    assert abs(brush_fraction(data, p) - p) <= tolerance, p
