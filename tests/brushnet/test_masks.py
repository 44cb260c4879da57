"""Mask codecs, the random brush generator, convention helpers, user masks and blurred blending."""

from __future__ import annotations

import time

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from brushnet.masks import (
    MaskError,
    benchmark_rle_decode,
    benchmark_rle_encode,
    blurred_blend,
    brushdata_rle_check,
    brushdata_rle_decode,
    brushdata_rle_encode,
    inpaint_to_keep,
    keep_to_inpaint,
    load_user_mask,
)

FAST = settings(max_examples=80, deadline=None)


def reference_decode(rle, height, width, order):
    """The official loop decode (train_brushnet.py rle2mask: order 'F'; evaluate_brushnet.py: order 'C')."""
    rle = np.array(rle, dtype=int)
    starts, lengths = rle[0::2] - 1, rle[1::2]
    img = np.zeros(height * width, dtype=np.uint8)
    for lo, hi in zip(starts, starts + lengths):
        img[lo:hi] = 1
    return img.reshape((height, width), order=order).astype(bool)


CODECS = [
    pytest.param(brushdata_rle_encode, brushdata_rle_decode, "F", id="brushdata"),
    pytest.param(benchmark_rle_encode, benchmark_rle_decode, "C", id="benchmark"),
]

masks_strategy = st.integers(1, 24).flatmap(
    lambda h: st.integers(1, 24).flatmap(lambda w: arrays(bool, (h, w), elements=st.booleans()))
)


@st.composite
def valid_rles(draw):
    """(rle, h, w): sorted, non-overlapping runs (possibly touching) within h*w pixels."""
    h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    cuts = sorted(draw(st.lists(st.integers(0, h * w), max_size=12, unique=True)))
    rle = []
    for lo, hi in zip(cuts[0::2], cuts[1::2]):
        if hi > lo:
            rle += [lo + 1, hi - lo]
    return rle, h, w


# ------------------------------------------------------------------------------------------------ RLE codecs


@pytest.mark.parametrize(("encode", "decode", "order"), CODECS)
@FAST
@given(mask=masks_strategy)
def test_rle_round_trip_and_reference(encode, decode, order, mask):
    rle = encode(mask)
    assert all(isinstance(v, int) for v in rle)
    out = decode(rle, *mask.shape)
    assert out.dtype == bool and out.shape == mask.shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, mask)
    np.testing.assert_array_equal(reference_decode(rle, *mask.shape, order), mask)
    # canonical: every run is maximal and 1-based
    starts, lengths = np.array(rle[0::2]), np.array(rle[1::2])
    assert (lengths >= 1).all() and (starts >= 1).all()
    assert (starts[1:] > starts[:-1] + lengths[:-1]).all()


@pytest.mark.parametrize(("encode", "decode", "order"), CODECS)
@FAST
@given(case=valid_rles())
def test_decode_matches_official_loop(encode, decode, order, case):
    rle, h, w = case
    np.testing.assert_array_equal(decode(rle, h, w), reference_decode(rle, h, w, order))


def test_orders_differ_as_documented():
    # 2x3 mask; the run covers flat pixels 1..2
    np.testing.assert_array_equal(brushdata_rle_decode([1, 2], 2, 3), [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(benchmark_rle_decode([1, 2], 2, 3), [[1, 1, 0], [0, 0, 0]])
    assert brushdata_rle_encode(np.array([[0, 1, 1], [0, 1, 0]])) == [3, 3]  # columns: 00 11 10
    assert benchmark_rle_encode(np.array([[0, 1, 1], [0, 1, 0]])) == [2, 2, 5, 1]
    assert benchmark_rle_decode([1, 1]).shape == (512, 512)  # BrushBench default size


@pytest.mark.parametrize(("encode", "decode", "order"), CODECS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (64, 512)])
def test_empty_and_full_masks(encode, decode, order, shape):
    h, w = shape
    assert encode(np.zeros(shape, bool)) == []
    assert encode(np.ones(shape, bool)) == [1, h * w]
    assert not decode([], h, w).any()
    assert decode([1, h * w], h, w).all()


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ([1, 2, 3], "odd length"),
        ([0, 2], "1-based"),
        ([-4, 2], "1-based"),
        ([3, 0], "length 0"),
        ([3, -1], "length -1"),
        ([12, 2], "runs past"),
        ([1, 13], "runs past"),
        ([2**62 + 1, 2**62 + 1], "runs past"),  # start + length would overflow int64
        ([1, 2, 2**62, 2**62 + 5], "runs past"),
        ([2**70, 1], "integers"),  # beyond int64: numpy makes an object array
        ([1, None], "integers"),
        ([5, 2, 1, 1], "unsorted"),
        ([1, 4, 3, 2], "overlap"),
        ([1.5, 2], "integers"),
        (["1", "2"], "integers"),
        ([[1, 2]], "flat"),
    ],
)
def test_bad_rles_raise_naming_the_problem(rle, message):
    for decode in (brushdata_rle_decode, benchmark_rle_decode):
        with pytest.raises(MaskError, match=message):
            decode(rle, 3, 4)
    with pytest.raises(MaskError, match=message):
        brushdata_rle_check(rle, 3, 4)


def test_touching_runs_and_integral_floats_are_accepted():
    np.testing.assert_array_equal(brushdata_rle_decode([1, 2, 3, 2], 2, 2), np.ones((2, 2), bool))
    np.testing.assert_array_equal(brushdata_rle_decode([1.0, 2.0], 2, 2), [[1, 0], [1, 0]])


@pytest.mark.parametrize("size", [(0, 4), (4, -1), (2.5, 4), (True, 4)])
def test_bad_sizes_raise(size):
    with pytest.raises(MaskError, match="positive integer"):
        brushdata_rle_decode([], *size)


@FAST
@given(case=valid_rles(), extra=st.integers(1, 50))
def test_any_run_past_the_end_raises(case, extra):
    rle, h, w = case
    end = (rle[-2] + rle[-1] - 1) if rle else 0
    with pytest.raises(MaskError, match="runs past"):
        brushdata_rle_decode([*rle, end + 1, h * w - end + extra], h, w)


def test_large_mask_decodes_fast():
    rng = np.random.default_rng(0)
    mask = np.zeros((1024, 1024), bool)
    for _ in range(400):  # thousands of runs, column-major
        y, x = rng.integers(0, 1000, 2)
        mask[y : y + rng.integers(1, 24), x : x + rng.integers(1, 24)] = True
    mask |= rng.random(mask.shape) < 0.002
    rle = brushdata_rle_encode(mask)
    assert len(rle) // 2 > 2000
    t = time.perf_counter()
    out = brushdata_rle_decode(rle, 1024, 1024)
    elapsed = time.perf_counter() - t
    np.testing.assert_array_equal(out, mask)
    np.testing.assert_array_equal(out, reference_decode(rle, 1024, 1024, "F"))
    assert elapsed < 0.5, f"decode of {len(rle) // 2} runs took {elapsed:.3f}s"


# ------------------------------------------------------------------------------------------------ conventions


def test_inpaint_keep_conversion_numpy_and_torch():
    inpaint = np.array([[True, False], [False, False]])
    keep = inpaint_to_keep(inpaint)
    assert keep.dtype == bool
    np.testing.assert_array_equal(keep, [[False, True], [True, True]])
    np.testing.assert_array_equal(keep_to_inpaint(keep), inpaint)
    soft = np.array([0.0, 0.25, 1.0], np.float32)
    np.testing.assert_allclose(inpaint_to_keep(soft), [1.0, 0.75, 0.0])
    t = torch.tensor([[1.0, 0.0]])
    assert torch.equal(inpaint_to_keep(t), torch.tensor([[0.0, 1.0]]))
    tb = torch.tensor([True, False])
    assert torch.equal(keep_to_inpaint(tb), torch.tensor([False, True]))
    assert inpaint_to_keep(np.zeros((0, 3))).shape == (0, 3)


def test_conversion_refuses_0_255_masks():
    with pytest.raises(MaskError, match=r"\[0, 255\]"):
        inpaint_to_keep(np.array([0, 255], np.uint8))
    with pytest.raises(MaskError, match="numpy array or torch tensor"):
        inpaint_to_keep([0, 1])


def test_load_user_mask_threshold_sizes_and_inputs(tmp_path):
    gray = np.zeros((30, 50), np.uint8)
    gray[:, 10] = 127
    gray[:, 11] = 128
    gray[5:10, 20:30] = 255
    PIL.Image.fromarray(gray).save(tmp_path / "m.png")
    expected = gray >= 128
    out = load_user_mask(tmp_path / "m.png")
    assert out.dtype == bool and out.shape == (30, 50)
    np.testing.assert_array_equal(out, expected)
    assert not out[:, 10].any() and out[:, 11].all()
    rgb = np.repeat(gray[..., None], 3, axis=2)
    PIL.Image.fromarray(rgb).save(tmp_path / "m_rgb.png")
    np.testing.assert_array_equal(load_user_mask(str(tmp_path / "m_rgb.png")), expected)
    np.testing.assert_array_equal(load_user_mask(PIL.Image.fromarray(rgb)), expected)
    np.testing.assert_array_equal(load_user_mask(expected), expected)
    np.testing.assert_array_equal(load_user_mask(rgb), expected)
    half = load_user_mask(tmp_path / "m.png", size=(15, 25))  # (height, width)
    assert half.shape == (15, 25) and half[3, 12] and not half[0, 0]


def test_load_user_mask_transparent_pixels_are_keep(tmp_path):
    rgba = np.full((10, 12, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[2:5, 3:9, 3] = 255  # the painted stroke
    PIL.Image.fromarray(rgba).save(tmp_path / "stroke.png")
    expected = np.zeros((10, 12), bool)
    expected[2:5, 3:9] = True
    np.testing.assert_array_equal(load_user_mask(tmp_path / "stroke.png"), expected)


def test_load_user_mask_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        load_user_mask(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(MaskError, match=r"junk\.png"):
        load_user_mask(tmp_path / "junk.png")
    with pytest.raises(MaskError, match="bool HxW"):
        load_user_mask(np.zeros((4, 4), np.float32))


# ------------------------------------------------------------------------------------------------ blending


def _images(h=80, w=96, region=(slice(30, 45), slice(40, 60))):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[region] = True
    return original, generated, mask


@pytest.mark.parametrize("blur_size", [21, 5, 0])
@pytest.mark.parametrize(
    "region", [(slice(30, 45), slice(40, 60)), (slice(0, 6), slice(90, 96))], ids=["middle", "corner"]
)
def test_blend_is_exact_inside_and_far_from_the_mask(blur_size, region):
    original, generated, mask = _images(region=region)
    out = blurred_blend(original, generated, mask, blur_size=blur_size)
    assert out.dtype == np.uint8 and out.shape == original.shape
    radius = blur_size // 2
    near = cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)) > 0
    np.testing.assert_array_equal(out[mask], generated[mask])
    np.testing.assert_array_equal(out[~near], original[~near])
    seam = near & ~mask
    if blur_size:
        mixed = (out[seam] != original[seam]).any(axis=-1)
        assert mixed.mean() > 0.5  # the seam really is blended
    else:
        assert not seam.any()


def test_blend_matches_the_official_formula():
    original, generated, mask = _images()
    m = mask[..., None].astype(np.float64)
    blurred = cv2.GaussianBlur(m * 255, (21, 21), 0)[..., None] / 255  # official test_brushnet.py
    m = 1 - (1 - m) * (1 - blurred)
    official = original * (1 - m) + generated * m
    out = blurred_blend(original, generated, mask)
    assert np.abs(out.astype(np.float64) - official).max() <= 0.5 + 1e-3  # we round, the official truncates


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blur_size": 4}, "odd"),
        ({"blur_size": -1}, "odd"),
        ({"generated": np.zeros((80, 96, 3), np.float32)}, "generated"),
        ({"inpaint_mask": np.zeros((8, 8), bool)}, "inpaint_mask"),
        ({"original": np.zeros((80, 96), np.uint8)}, "original"),
    ],
)
def test_blend_rejects_bad_input(kwargs, message):
    original, generated, mask = _images()
    args = {"original": original, "generated": generated, "inpaint_mask": mask, **kwargs}
    with pytest.raises(MaskError, match=message):
        blurred_blend(**args)
