"""BrushData samples: encode/decode round trips and every bad-sample error."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brushnet.brushdata import (
    MEMBER_ORDER,
    BrushDataError,
    decode_sample,
    encode_sample,
)
from tests.brushnet.brushdata_builders import make_sample, masks, photo


@pytest.mark.parametrize("meta", [None, {"source": "laion", "score": 0.5, "tags": ["a", "b"]}])
def test_encode_decode_round_trip(meta):
    sample = make_sample(meta=meta)
    members = encode_sample(sample)
    assert tuple(members) == MEMBER_ORDER
    assert members["height"] == b"24" and members["width"] == b"40"
    assert json.loads(members["segmentation"]) == {"mask": sample.masks}
    decoded = decode_sample(members, key="k0001", shard="s.tar")
    assert decoded.key == "k0001" and decoded.caption == sample.caption and decoded.meta == meta
    assert (decoded.height, decoded.width) == (24, 40) and decoded.masks_rle == sample.masks
    assert decoded.image.dtype == np.uint8 and decoded.image.shape == (24, 40, 3)
    assert np.abs(decoded.image.astype(int) - photo(24, 40)).mean() < 6  # RGB, not BGR (JPEG is lossy)
    for i, m in enumerate(masks(24, 40)):
        np.testing.assert_array_equal(decoded.mask(i), m)


def test_official_samples_without_json_member_decode():
    members = encode_sample(make_sample())
    del members["json"]
    assert decode_sample(members, key="k0001").meta is None


def _bad(change):
    members = encode_sample(make_sample("bad01"))
    change(members)
    return members


BAD_SAMPLES = {
    "missing image": (lambda m: m.pop("image"), "missing member.*image"),
    "missing caption": (lambda m: m.pop("caption"), "missing member.*caption"),
    "missing segmentation": (lambda m: m.pop("segmentation"), "missing member.*segmentation"),
    "caption not utf-8": (lambda m: m.update(caption=b"caf\xe9 \xff"), "caption is not valid UTF-8"),
    "height disagrees": (lambda m: m.update(height=b"25"), "say 25x40 but the image decodes to 24x40"),
    "width disagrees": (lambda m: m.update(width=b"41"), "say 24x41"),
    "width not an int": (lambda m: m.update(width=b"forty"), "width is not a decimal integer"),
    "height zero": (lambda m: m.update(height=b"0"), "height must be positive"),
    "image corrupt": (lambda m: m.update(image=b"\xff\xd8 not a jpeg"), "could not be decoded"),
    "segmentation bad json": (
        lambda m: m.update(segmentation=b'{"mask": [1, 2'),
        "segmentation is not valid JSON",
    ),
    "segmentation not an object": (
        lambda m: m.update(segmentation=b"[[1, 2]]"),
        'must be a JSON object {"mask"',
    ),
    "rle out of bounds": (
        lambda m: m.update(segmentation=json.dumps({"mask": [[1, 2], [24 * 40 - 2, 50]]}).encode()),
        "segmentation mask 1: RLE run 0 .* runs past",
    ),
    "rle odd": (lambda m: m.update(segmentation=b'{"mask": [[1, 2, 3]]}'), "mask 0: RLE has odd length"),
    "rle not a list": (lambda m: m.update(segmentation=b'{"mask": [7]}'), "mask 0 is not a list"),
    "json meta bad": (lambda m: m.update(json=b"{oops"), "json is not valid JSON"),
    "json meta not an object": (lambda m: m.update(json=b"[1]"), "json must be an object"),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_each_bad_sample_names_shard_key_and_reason(case):
    change, reason = BAD_SAMPLES[case]
    with pytest.raises(BrushDataError, match=reason) as info:
        decode_sample(_bad(change), key="bad01", shard="/data/shard-7.tar")
    err = info.value
    assert (err.shard, err.key) == ("/data/shard-7.tar", "bad01")
    assert "/data/shard-7.tar" in str(err) and "'bad01'" in str(err)
    assert isinstance(err, ValueError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(["mask", "x"]), inner, max_size=2)
    ),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None)
@given(
    segmentation=json_values,
    meta=json_values,
    height=st.binary(max_size=6) | st.integers(-3, 30).map(lambda v: str(v).encode()),
    image=st.none() | st.binary(max_size=64),
)
def test_arbitrary_member_contents_raise_only_brushdata_errors(segmentation, meta, height, image):
    members = encode_sample(make_sample())
    members["segmentation"] = json.dumps({"mask": segmentation} if image is None else segmentation).encode()
    members["json"] = json.dumps(meta).encode()
    members["height"] = height
    if image is not None:
        members["image"] = image
    try:
        decoded = decode_sample(members, key="fuzz", shard="f.tar")
    except BrushDataError as e:
        assert e.key == "fuzz" and e.shard == "f.tar"
        return
    for i in range(len(decoded.masks_rle)):  # whatever was accepted decodes within bounds
        assert decoded.mask(i).shape == (decoded.height, decoded.width)


def test_brushdata_error_pickles():
    err = BrushDataError(Path("a/b.tar"), "k1", "boom")
    again = pickle.loads(pickle.dumps(err))
    assert (again.shard, again.key, again.reason, str(again)) == ("a/b.tar", "k1", "boom", str(err))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key": "a.b"}, "must not contain"),
        ({"key": "a/b"}, "must not contain"),
        ({"key": ""}, "non-empty"),
        ({"height": 25}, "differ from the image's 24x40"),
        ({"masks": [[900, 100]]}, "mask 0: RLE run 0"),
        ({"image": b"junk"}, "not a readable image"),
        ({"meta": {"x": object()}}, "not JSON-serialisable"),
        ({"meta": [1, 2]}, "meta must be a dict"),
    ],
)
def test_encode_refuses_bad_samples(change, message):
    sample = make_sample()
    for name, value in change.items():
        setattr(sample, name, value)
    with pytest.raises(BrushDataError, match=message):
        encode_sample(sample)


def _exif_rotated_jpeg(h: int, w: int) -> bytes:
    import PIL.Image

    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" on display
    buf = io.BytesIO()
    PIL.Image.fromarray(photo(h, w)).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotation_refused_on_write_and_ignored_on_read():
    sample = make_sample()
    sample.image = _exif_rotated_jpeg(24, 40)
    with pytest.raises(BrushDataError, match="EXIF orientation 6"):
        encode_sample(sample)
    members = encode_sample(make_sample())
    members["image"] = sample.image  # a foreign shard: decoded on the stored grid that height/width describe
    assert decode_sample(members, key="k0001").image.shape == (24, 40, 3)


def test_grayscale_jpeg_decodes_to_rgb():
    members = encode_sample(make_sample())
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(photo(24, 40), cv2.COLOR_RGB2GRAY))
    members["image"] = buf.tobytes()
    image = decode_sample(members, key="k0001").image
    assert image.shape == (24, 40, 3) and (image[..., 0] == image[..., 2]).all()
