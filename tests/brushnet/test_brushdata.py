"""BrushData samples, shards (writer, scanner, reader) and the dataset index."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brushnet.brushdata import (
    MEMBER_ORDER,
    BrushDataError,
    BrushDataSample,
    DatasetIndexError,
    ShardWriter,
    decode_sample,
    encode_sample,
    load_index,
    read_sample,
    scan_shard,
    verify_index,
    write_index,
)
from brushnet.masks import brushdata_rle_encode


@cache
def _photo(h: int, w: int) -> np.ndarray:
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (w, h), interpolation=cv2.INTER_AREA)


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _masks(h: int, w: int) -> list[np.ndarray]:
    a = np.zeros((h, w), bool)
    a[2:10, 5:20] = True
    b = np.zeros((h, w), bool)
    b[h // 2 :, : w // 3] = True
    return [a, b]


def make_sample(key: str = "k0001", h: int = 24, w: int = 40, meta: dict | None = None) -> BrushDataSample:
    return BrushDataSample(
        key=key,
        image=_jpeg(_photo(h, w)),
        caption="an astronaut — café",
        height=h,
        width=w,
        masks=[brushdata_rle_encode(m) for m in _masks(h, w)],
        meta=meta,
    )


def write_shard(folder: Path, name: str, keys: list[str], **kw) -> Path:
    with ShardWriter(folder, name) as writer:
        for key in keys:
            writer.write(make_sample(key, **kw))
    return folder / f"{name}.tar"


# ------------------------------------------------------------------------------------------------ samples


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
    assert np.abs(decoded.image.astype(int) - _photo(24, 40)).mean() < 6  # RGB, not BGR (JPEG is lossy)
    for i, m in enumerate(_masks(24, 40)):
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
    PIL.Image.fromarray(_photo(h, w)).save(buf, "JPEG", exif=exif.tobytes())
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
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(_photo(24, 40), cv2.COLOR_RGB2GRAY))
    members["image"] = buf.tobytes()
    image = decode_sample(members, key="k0001").image
    assert image.shape == (24, 40, 3) and (image[..., 0] == image[..., 2]).all()


# ------------------------------------------------------------------------------------------------ shards


def test_shard_writer_layout_offsets_and_reads(tmp_path):
    keys = [f"s{i:04d}" for i in range(5)]
    path = write_shard(tmp_path, "shard-000", keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000.tar"]  # temp renamed away
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
        names = [i.name for i in infos]
        assert names == [f"{k}.{m}" for k in keys for m in MEMBER_ORDER]
        extracted = {i.name: tar.extractfile(i).read() for i in infos}
        expected_offsets = {i.name: (i.offset_data, i.size) for i in infos}
    records = scan_shard(path)
    assert [r.key for r in records] == keys
    raw = path.read_bytes()
    for record in records:
        assert list(record.members) == list(MEMBER_ORDER)
        for suffix, (off, size) in record.members.items():
            name = f"{record.key}.{suffix}"
            assert (off, size) == expected_offsets[name]
            assert raw[off : off + size] == extracted[name]
        members = read_sample(path, record)
        assert members == {s: extracted[f"{record.key}.{s}"] for s in MEMBER_ORDER}
        assert decode_sample(members, key=record.key, shard=path).caption == "an astronaut — café"


def test_shard_writer_is_deterministic(tmp_path):
    a = write_shard(tmp_path / "a", "x", ["k1", "k2"])
    b = write_shard(tmp_path / "b", "x", ["k1", "k2"])
    assert a.read_bytes() == b.read_bytes()


def test_shard_writer_removes_temp_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="stop"), ShardWriter(tmp_path, "broken") as writer:
        writer.write(make_sample("k1"))
        assert writer.tmp_path.exists() and not writer.path.exists()
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_failing_to_finish_leaves_nothing(tmp_path, monkeypatch):
    import brushnet.brushdata.shards as bd

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bd.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"), ShardWriter(tmp_path, "full") as writer:
        writer.write(make_sample("k1"))
    assert list(tmp_path.iterdir()) == []


def test_shard_writer_rejects_dotted_and_duplicate_keys_but_keeps_going(tmp_path):
    with ShardWriter(tmp_path, "s") as writer:
        writer.write(make_sample("k1"))
        with pytest.raises(BrushDataError, match="must not contain"):
            writer.write(make_sample("k.2"))
        with pytest.raises(BrushDataError, match="duplicate key"):
            writer.write(make_sample("k1"))
        writer.write(make_sample("k3"))  # a refused sample leaves the shard consistent
    assert [r.key for r in scan_shard(tmp_path / "s.tar")] == ["k1", "k3"]
    assert writer.count == 2


def _foreign_tar(path: Path, names_and_data: list[tuple[str, bytes]], fmt: int) -> dict[str, tuple[int, int]]:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in names_and_data:
            if name.endswith("/"):
                info = tarfile.TarInfo(name.rstrip("/"))
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {i.name: (i.offset_data, i.size) for i in tar.getmembers() if i.isfile()}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_handles_long_names_folders_and_formats(tmp_path, fmt):
    long_key = "sub/" + "k" * 150 if fmt != tarfile.USTAR_FORMAT else "sub/" + "k" * 90
    entries = [
        ("sub/", b""),
        (f"{long_key}.image", b"x" * 700),
        (f"{long_key}.caption", "é".encode() * 3),
        ("other.image", b"y" * 1024),
        ("other.seg.json", b"{}"),
        ("README", b"no suffix: not a member"),
    ]
    expected = _foreign_tar(tmp_path / "f.tar", entries, fmt)
    records = scan_shard(tmp_path / "f.tar")
    assert [r.key for r in records] == [long_key, "other"]
    assert records[0].members == {
        "image": expected[f"{long_key}.image"],
        "caption": expected[f"{long_key}.caption"],
    }
    assert records[1].members == {"image": expected["other.image"], "seg.json": expected["other.seg.json"]}


member_names = st.tuples(
    st.text("abcxyz0123_-", min_size=1, max_size=120),
    st.sampled_from(["image", "caption", "seg.json", "txt"]),
    st.sampled_from([0, 1, 511, 512, 513, 1024, 2000]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(member_names, min_size=1, max_size=12, unique_by=lambda e: (e[0], e[1])),
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
)
def test_scan_offsets_match_tarfile_for_random_tars(tmp_path, entries, fmt):
    entries = sorted(entries, key=lambda e: e[0])  # members of a key are contiguous
    if fmt == tarfile.USTAR_FORMAT:
        entries = [(k[:90], s, n) for k, s, n in entries]
        entries = list({(k, s): (k, s, n) for k, s, n in entries}.values())
    rng = np.random.default_rng(len(entries))
    payloads = [(f"{k}.{s}", rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for k, s, n in entries]
    path = tmp_path / "r.tar"
    expected = _foreign_tar(path, payloads, fmt)
    records = scan_shard(path)
    assert [r.key for r in records] == list(dict.fromkeys(k for k, _, _ in entries))
    got = {f"{r.key}.{suffix}": span for r in records for suffix, span in r.members.items()}
    assert got == expected
    raw = path.read_bytes()
    for name, data in payloads:
        off, size = got[name]
        assert raw[off : off + size] == data


def test_compressed_shards_are_refused(tmp_path):
    import gzip

    path = write_shard(tmp_path, "s", ["k1"])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    with pytest.raises(BrushDataError, match="gzip-compressed"):
        scan_shard(tmp_path / "s.tar.gz")


def test_truncated_shard_names_shard_and_last_good_key(tmp_path):
    path = write_shard(tmp_path, "t", ["k1", "k2", "k3"])
    data = path.read_bytes()
    records = scan_shard(path)
    cuts = {
        "inside k2's image": records[1].members["image"][0] + 10,
        "inside a header of k2": records[1].members["caption"][0] - 300,
        "at k3's first header": records[2].members["image"][0] - 512,
        "before the end marker": records[2].members["json"][0] + 512,
    }
    # A sample counts as complete once a member of the next sample has been read.
    last_good = {
        "inside k2's image": "k1",
        "inside a header of k2": "k1",
        "at k3's first header": "k1",
        "before the end marker": "k2",
    }
    for where, cut in cuts.items():
        cut_path = tmp_path / "cut.tar"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(BrushDataError, match="truncated tar") as info:
            scan_shard(cut_path)
        message = str(info.value)
        assert str(cut_path) in message, where
        assert f"last complete sample: '{last_good[where]}'" in message, (where, message)


def test_truncated_first_sample_and_corrupt_header(tmp_path):
    path = write_shard(tmp_path, "t", ["k1", "k2"])
    data = path.read_bytes()
    (tmp_path / "c.tar").write_bytes(data[:700])
    with pytest.raises(BrushDataError, match="no complete sample before it") as info:
        scan_shard(tmp_path / "c.tar")
    assert info.value.key == "k1"
    corrupt = bytearray(data)
    header = scan_shard(path)[1].members["image"][0] - 512
    corrupt[header] ^= 0x01  # k2's first header: its name
    (tmp_path / "h.tar").write_bytes(bytes(corrupt))
    with pytest.raises(BrushDataError, match=rf"byte {header} \(bad checksum.*belongs to 'k1'") as info:
        scan_shard(tmp_path / "h.tar")
    assert info.value.key == "?"


def test_scan_rejects_files_that_are_not_tars(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(BrushDataError, match="truncated tar: ends inside or before a header at byte 0"):
        scan_shard(tmp_path / "empty.tar")
    (tmp_path / "photo.tar").write_bytes(_jpeg(_photo(24, 40)))
    with pytest.raises(BrushDataError, match="corrupt tar header at byte 0"):
        scan_shard(tmp_path / "photo.tar")
    header = bytearray(tarfile.TarInfo("k.image").tobuf())
    header[124:136] = b"zzzzzzzzzzz\0"  # size field that is not octal
    (tmp_path / "num.tar").write_bytes(bytes(header) + b"\0" * 1024)
    with pytest.raises(BrushDataError, match="number field"):
        scan_shard(tmp_path / "num.tar")
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 3
    (tmp_path / "pax.tar").write_bytes(
        pax.tobuf(tarfile.USTAR_FORMAT) + b"0 x".ljust(512, b"\0") + b"\0" * 1024
    )
    with pytest.raises(BrushDataError, match="corrupt pax header at byte 0"):
        scan_shard(tmp_path / "pax.tar")


def test_scan_rejects_repeated_keys_and_members(tmp_path):
    _foreign_tar(
        tmp_path / "a.tar", [("a.image", b"1"), ("b.image", b"2"), ("a.caption", b"3")], tarfile.USTAR_FORMAT
    )
    with pytest.raises(BrushDataError, match="appears again"):
        scan_shard(tmp_path / "a.tar")
    _foreign_tar(tmp_path / "b.tar", [("a.image", b"1"), ("a.image", b"2")], tarfile.USTAR_FORMAT)
    with pytest.raises(BrushDataError, match="appears twice"):
        scan_shard(tmp_path / "b.tar")


def test_read_sample_of_a_shard_truncated_after_scanning(tmp_path):
    path = write_shard(tmp_path, "t", ["k1", "k2"])
    records = scan_shard(path)
    path.write_bytes(path.read_bytes()[: records[1].members["caption"][0]])
    assert read_sample(path, records[0])["caption"] == "an astronaut — café".encode()
    with pytest.raises(BrushDataError, match="truncated tar: member 'caption'") as info:
        read_sample(path, records[1])
    assert info.value.key == "k2"


# ------------------------------------------------------------------------------------------------ index


def test_index_round_trip_relative_and_movable(tmp_path):
    data = tmp_path / "data"
    shards = [
        write_shard(data / "shards", f"shard-{i:03d}", [f"s{i}{j}" for j in range(3)]) for i in range(2)
    ]
    index = write_index(shards, data / "index.json")
    assert [p.name for p in data.iterdir() if "tmp" in p.name] == []
    doc = json.loads((data / "index.json").read_text())
    assert (doc["format"], doc["version"]) == ("brushdata-index", 1)
    first = doc["shards"][0]
    assert first["path"] == "shards/shard-000.tar" and first["num_samples"] == 3
    assert first["bytes"] == shards[0].stat().st_size
    assert first["sha256"] == hashlib.sha256(shards[0].read_bytes()).hexdigest()
    assert first["samples"][0]["key"] == "s00" and list(first["samples"][0]["members"]) == list(MEMBER_ORDER)
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    loaded = load_index(moved / "index.json")
    assert loaded.num_samples == 6 == index.num_samples
    for entry, original in zip(loaded.shards, index.shards):
        assert entry.file == moved / "shards" / original.file.name
        assert entry.samples == original.samples == scan_shard(entry.file)
        record = entry.samples[2]
        assert decode_sample(read_sample(entry.file, record), key=record.key).key == record.key
    verify_index(loaded)


def test_index_stores_shards_outside_root_absolutely(tmp_path):
    shard = write_shard(tmp_path / "elsewhere", "s", ["k1"])
    write_index([shard], tmp_path / "idx" / "index.json")
    doc = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert doc["shards"][0]["path"] == str(shard.absolute())
    write_index([shard], tmp_path / "idx" / "index2.json", root=tmp_path)
    doc = json.loads((tmp_path / "idx" / "index2.json").read_text())
    assert doc["shards"][0]["path"] == "../elsewhere/s.tar"
    assert load_index(tmp_path / "idx" / "index2.json").shards[0].file.resolve() == shard.resolve()


def test_load_index_errors_name_the_problem(tmp_path):
    shard = write_shard(tmp_path, "s", ["k1"])
    index = tmp_path / "index.json"
    write_index([shard], index)
    good = json.loads(index.read_text())

    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_index(tmp_path / "missing.json")
    cases = [
        ("not json {", DatasetIndexError, "not a JSON index"),
        (json.dumps({**good, "format": "webdataset"}), DatasetIndexError, "format is 'webdataset'"),
        (json.dumps({**good, "version": 2}), DatasetIndexError, "version 2 is not supported"),
        (json.dumps({**good, "shards": {}}), DatasetIndexError, "'shards' must be a list"),
        (
            json.dumps({**good, "shards": [{"path": "s.tar"}]}),
            DatasetIndexError,
            "shard entry 0 is malformed",
        ),
        (
            json.dumps({**good, "shards": [{**good["shards"][0], "num_samples": 5}]}),
            DatasetIndexError,
            "num_samples=5",
        ),
        (
            json.dumps(
                {
                    **good,
                    "shards": [{**good["shards"][0], "samples": [{"key": "k1", "members": {"image": [1]}}]}],
                }
            ),
            DatasetIndexError,
            r"\[offset, size\]",
        ),
        (
            json.dumps({**good, "shards": [{**good["shards"][0], "path": "gone.tar"}]}),
            FileNotFoundError,
            "gone.tar",
        ),
    ]
    for text, error, message in cases:
        index.write_text(text)
        with pytest.raises(error, match=message) as info:
            load_index(index)
        assert str(index) in str(info.value)


def test_verify_index_detects_changed_shards(tmp_path, caplog):
    shard = write_shard(tmp_path, "s", ["k1", "k2"])
    write_index([shard], tmp_path / "index.json")
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(BrushDataError, match="sha256"):
        verify_index(load_index(tmp_path / "index.json"))
    shard.write_bytes(bytes(data[:-1024]))
    index = load_index(tmp_path / "index.json")  # loading still works: bad samples surface when read
    assert "changed after indexing" in caplog.text
    with pytest.raises(BrushDataError, match="bytes"):
        verify_index(index)


def test_write_index_refuses_truncated_shards(tmp_path):
    shard = write_shard(tmp_path, "s", ["k1", "k2"])
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(BrushDataError, match="truncated"):
        write_index([shard], tmp_path / "index.json")
    assert not (tmp_path / "index.json").exists()
