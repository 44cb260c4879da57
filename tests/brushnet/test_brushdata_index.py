"""The BrushData dataset index: round trip, relative paths, load errors, verification."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from brushnet.brushdata import (
    MEMBER_ORDER,
    BrushDataError,
    DatasetIndexError,
    decode_sample,
    load_index,
    read_sample,
    scan_shard,
    verify_index,
    write_index,
)
from tests.brushnet.brushdata_builders import write_shard


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
