"""Bad BrushData samples are skipped, counted (``num_bad`` in the batch) and replaced deterministically;
too many of them stop the run with an error naming the shard and key."""

from __future__ import annotations

import json
import logging

import pytest

from brushnet.brushdata import BrushDataError, scan_shard, write_index
from tests.train.data_builders import good_members, tokenizer_folder, write_raw_tar
from train.data import BrushDataModule

RES = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return str(tokenizer_folder(tmp_path_factory.mktemp("tok")))


def _bad_cases() -> dict[str, dict[str, bytes]]:
    """One broken sample of each kind, made from a good one."""
    cases = {}
    m = good_members("badimage", 0)
    m["image"] = b"\xff\xd8 this is not a jpeg"
    cases["badimage"] = m
    m = good_members("badrle", 1)
    m["segmentation"] = json.dumps({"mask": [[48 * 64 - 2, 50]]}).encode()  # run past h*w
    cases["badrle"] = m
    m = good_members("badsize", 2)
    m["height"] = b"49"  # the JPEG is 48 high
    cases["badsize"] = m
    m = good_members("nocaption", 3)
    del m["caption"]
    cases["nocaption"] = m
    m = good_members("badutf8", 4)
    m["caption"] = b"caf\xe9 \xff"
    cases["badutf8"] = m
    return cases


def build_bad_corpus(folder):
    """shard-000: 6 good + one of each bad kind interleaved; shard-001: 4 good, truncated after its index."""
    samples, n = [], 0
    for key, members in _bad_cases().items():
        samples.append((f"g{n:03d}", good_members(f"g{n:03d}", n)))
        n += 1
        samples.append((key, members))
    samples.append((f"g{n:03d}", good_members(f"g{n:03d}", n)))
    n += 1
    first = write_raw_tar(folder / "shard-000.tar", samples)
    second = write_raw_tar(
        folder / "shard-001.tar", [(f"g{n + i:03d}", good_members(f"g{n + i:03d}", i)) for i in range(4)]
    )
    index = folder / "index.json"
    write_index([first, second], index, root=folder)
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])  # the index still promises every sample: the tail is bad
    return index


def test_each_bad_kind_is_skipped_and_counted(tmp_path, tok, caplog):
    index = build_bad_corpus(tmp_path)
    dm = BrushDataModule(
        index=str(index),
        tokenizer=tok,
        resolution=RES,
        batch_size=1,
        num_workers=0,
        max_bad_fraction=1.0,
        morph_prob=0.0,
    )
    with caplog.at_level(logging.WARNING, logger="train.data.datasets"):
        batches = list(dm.train_dataloader_for(0, 1))
    assert len(batches) == len(dm.table) == 15
    keys = [k for b in batches for k in b["keys"]]
    assert all(k.startswith("g") for k in keys)  # only good samples reach the batches
    bad = {key for b in batches for _, key in b["bad_samples"]}
    assert set(_bad_cases()) <= bad
    truncated = bad - set(_bad_cases())
    assert truncated and all(k.startswith("g") for k in truncated)
    assert (
        sum(int(b["num_bad"]) for b in batches)
        == sum(len(b["bad_samples"]) for b in batches)
        == dm.bad_samples
    )
    logged = caplog.text
    for key in _bad_cases():
        assert key in logged and "shard-000.tar" in logged
    assert "truncated" in logged and "shard-001.tar" in logged


def test_bad_samples_replaced_deterministically(tmp_path, tok):
    index = build_bad_corpus(tmp_path)

    def run(workers):
        dm = BrushDataModule(
            index=str(index),
            tokenizer=tok,
            resolution=RES,
            batch_size=3,
            num_workers=workers,
            max_bad_fraction=1.0,
        )
        return [(b["keys"], int(b["num_bad"])) for b in dm.train_dataloader_for(0, 1)]

    assert run(0) == run(2)


def test_too_many_bad_samples_raise_naming_shard_and_key(tmp_path, tok):
    index = build_bad_corpus(tmp_path)
    dm = BrushDataModule(
        index=str(index),
        tokenizer=tok,
        resolution=RES,
        batch_size=1,
        num_workers=0,
        max_bad_fraction=0.05,
        bad_check_min_samples=5,
    )
    with pytest.raises(BrushDataError, match=r"max_bad_fraction=0\.05") as info:
        list(dm.train_dataloader_for(0, 1))
    message = str(info.value)
    assert "shard-00" in message and any(k in message for k in [*_bad_cases(), "g0"])


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_shard_in_a_list_is_counted_named_and_its_intact_samples_kept(tmp_path, tok, caplog, damage):
    """Scanned shards (no index): a truncated or empty shard next to good ones keeps its intact samples, its
    lost samples count as bad samples (what ``train/bad_samples`` logs) and the WARNING names it, also
    when the cached index is reused."""
    write_raw_tar(tmp_path / "shard-000.tar", [(f"g{i}", good_members(f"g{i}", i)) for i in range(3)])
    broken = write_raw_tar(
        tmp_path / "shard-001.tar", [(f"h{i}", good_members(f"h{i}", i)) for i in range(4)]
    )
    if damage == "truncated":  # cut inside h2's image: h0, h1 intact, h2 lost, h3 gone with the tail
        cut = dict(scan_shard(broken)[2].members)["image"][0] + 10
        broken.write_bytes(broken.read_bytes()[:cut])
    else:
        broken.write_bytes(b"")
    intact = ["g0", "g1", "g2", *(["h0", "h1"] if damage == "truncated" else [])]

    def datamodule() -> BrushDataModule:
        return BrushDataModule(
            train_shards=str(tmp_path / "*.tar"), tokenizer=tok, resolution=RES, batch_size=1, num_workers=0
        )

    for run in ("scan", "cached index"):
        caplog.clear()
        dm = datamodule()
        with caplog.at_level(logging.WARNING, logger="train.data.shards"):
            dm.prepare_data()
            dm.setup()
        assert sorted(dm.table.key(i) for i in range(len(dm.table))) == intact, run
        assert dm.bad_samples == 1, run  # h2 (truncated) / the shard's unknown content (empty), once
        assert "damaged shard" in caplog.text and "shard-001.tar" in caplog.text, run
        assert f"training on its {len(intact) - 3} intact samples, 1 lost" in caplog.text, run
    batches = list(dm.train_dataloader_for(0, 1))
    assert sorted(k for b in batches for k in b["keys"]) == intact  # the kept samples read and decode
    assert sum(int(b["num_bad"]) for b in batches) == 0
    assert dm.bad_samples == 1
