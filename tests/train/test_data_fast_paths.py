"""The loader's fast paths give the training inputs of the straightforward ones: reduced-scale JPEG decode
(same crop, same mask, close pixels), the RLE decode's transpose, uint8 batches normalised on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brushnet.brushdata import BrushDataError, decode_sample, encode_sample
from brushnet.masks import brushdata_rle_decode, brushdata_rle_encode
from tests.train.data_builders import make_sample, tokenizer_folder, write_shards
from train.data import BrushDataModule, datasets
from train.data.transforms import normalize_batch

RES = 32


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (48, 64), (301, 257)])
def test_rle_decode_equals_the_column_major_reference(shape):
    mask = np.random.default_rng(sum(shape)).random(shape) > 0.6
    rle = brushdata_rle_encode(mask)
    reference = np.zeros(mask.size, bool)  # the official rle2mask loop
    for start, length in zip(rle[0::2], rle[1::2]):
        reference[start - 1 : start - 1 + length] = True
    decoded = brushdata_rle_decode(rle, *shape)
    assert decoded.dtype == bool and decoded.flags.c_contiguous
    assert np.array_equal(decoded, reference.reshape(shape, order="F"))
    assert np.array_equal(decoded, mask)


def test_reduced_jpeg_decode_keeps_stored_size_and_masks():
    members = encode_sample(make_sample("k", 0, height=130, width=100, num_masks=1))
    full = decode_sample(members, key="k")
    assert full.image.shape == (130, 100, 3)
    assert decode_sample(members, key="k", min_size=50).image.shape == (65, 50, 3)  # 1/2: short side 50
    assert decode_sample(members, key="k", min_size=25).image.shape == (33, 25, 3)  # 1/4, sizes round up
    assert decode_sample(members, key="k", min_size=51).image.shape == (130, 100, 3)  # 1/2 would be < 51
    small = decode_sample(members, key="k", min_size=25)
    assert (small.height, small.width) == (130, 100)
    assert np.array_equal(small.mask(0), full.mask(0))
    members["height"] = b"128"
    with pytest.raises(BrushDataError, match="say 128x100 but the image decodes to 33x25 at 1/4 scale"):
        decode_sample(members, key="k", min_size=25)


def test_reduced_decode_is_jpeg_only():
    import cv2

    members = encode_sample(make_sample("k", 0, height=128, width=96))
    bgr = cv2.imdecode(np.frombuffer(members["image"], np.uint8), cv2.IMREAD_COLOR)
    members["image"] = cv2.imencode(".png", bgr)[1].tobytes()
    assert decode_sample(members, key="k", min_size=24).image.shape == (128, 96, 3)


def test_loader_with_reduced_decode_matches_full_decode(tmp_path, monkeypatch):
    """Sources at least twice the training size are decoded at 1/2 (or less): the batch has the same
    keys, masks, sizes and crop as with the full decode, and pixels within JPEG-scaling differences."""
    shards = write_shards(tmp_path / "d", [6], height=2 * RES + 8, width=3 * RES, num_masks=2)
    tok = str(tokenizer_folder(tmp_path / "tok"))

    def batches() -> list[dict]:
        dm = BrushDataModule(
            train_shards=[str(p) for p in shards], tokenizer=tok, resolution=RES, batch_size=3, num_workers=0
        )
        return list(dm.train_dataloader_for(0, 1))

    fast = batches()
    seen: list[int | None] = []
    full_decode = datasets.decode_sample

    def spy(members, *, key, shard, min_size=None):
        seen.append(min_size)
        return full_decode(members, key=key, shard=shard)

    monkeypatch.setattr(datasets, "decode_sample", spy)
    slow = batches()
    assert seen and set(seen) == {RES}  # the loader asks for the reduced decode
    for a, b in zip(fast, slow, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("masks", "original_size", "crop_top_left", "input_ids"):
            assert torch.equal(a[name], b[name]), name
        # 72x96 photos -> 32 px alias a lot either way; at 1365x1024 -> 512 the mean difference is 1-1.7 levels
        diff = (a["pixel_values"].float() - b["pixel_values"].float()).abs()
        assert diff.mean() < 12 and not torch.equal(a["pixel_values"], b["pixel_values"])


def test_normalize_batch_is_the_float_formula():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, RES, RES, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    keep = (torch.rand(2, 1, RES, RES, generator=g) > 0.5).to(torch.uint8)
    out = normalize_batch({"pixel_values": pixels, "masks": keep, "keys": ["a", "b"]})
    as_float = pixels.float()
    assert torch.equal(out["pixel_values"], as_float / 127.5 - 1.0)
    assert torch.equal(out["conditioning_pixel_values"], (as_float * keep.float()) / 127.5 - 1.0)
    assert (out["conditioning_pixel_values"][keep.expand_as(pixels) == 0] == -1.0).all()
    assert out["keys"] == ["a", "b"] and out["masks"].dtype == torch.float32
