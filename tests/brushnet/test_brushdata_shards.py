"""BrushData shards: the atomic writer, the tar scanner's byte offsets, reads and bad tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from brushnet.brushdata import (
    MEMBER_ORDER,
    BrushDataError,
    ShardWriter,
    decode_sample,
    read_sample,
    scan_shard,
)
from tests.brushnet.brushdata_builders import jpeg, make_sample, photo, write_shard


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
    (tmp_path / "photo.tar").write_bytes(jpeg(photo(24, 40)))
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


def test_broken_header_after_a_pax_header_is_named_not_the_pax_header(tmp_path):
    long_key = "k" * 120  # longer than ustar's 100-byte name: a pax header carries the path
    payloads = [("a.image", b"1" * 600), (f"{long_key}.image", b"2" * 700), ("z.image", b"3")]
    spans = _foreign_tar(tmp_path / "p.tar", payloads, tarfile.PAX_FORMAT)
    data = (tmp_path / "p.tar").read_bytes()
    member_header = spans[f"{long_key}.image"][0] - 512  # the pax header and its records come before it
    pax_header = member_header - 1024
    assert data[pax_header + 156 : pax_header + 157] == tarfile.XHDTYPE
    corrupt = bytearray(data)
    corrupt[member_header + 10] ^= 0x01
    (tmp_path / "c.tar").write_bytes(bytes(corrupt))
    with pytest.raises(BrushDataError, match=rf"corrupt tar header at byte {member_header} \(bad checksum"):
        scan_shard(tmp_path / "c.tar")
    (tmp_path / "t.tar").write_bytes(data[: pax_header + 600])  # inside the pax records
    with pytest.raises(
        BrushDataError, match=r"member '\./\./@PaxHeader' needs .*\(last complete sample: 'a'\)"
    ):
        scan_shard(tmp_path / "t.tar")
    corrupt = bytearray(data)
    corrupt[pax_header + 512 : pax_header + 515] = b"0 x"  # a zero-length pax record
    (tmp_path / "r.tar").write_bytes(bytes(corrupt))
    with pytest.raises(BrushDataError, match=rf"corrupt pax header at byte {pax_header}"):
        scan_shard(tmp_path / "r.tar")
