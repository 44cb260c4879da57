"""Shards: readable by HF `datasets` (the official trainer's loader), validate/index, bad samples, Slurm split."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from brushnet.brushdata import load_index
from data_pipeline.config import LabelConfig
from data_pipeline.label import run_label
from data_pipeline.sharding import TaskSlice, resolve_task_slice
from data_pipeline.validate import run_validate
from tests.data_pipeline.helpers import photo, write_download_unit
from tests.data_pipeline.test_label import BoxLabeler


@pytest.fixture
def labelled_run(tmp_path):
    write_download_unit(tmp_path, [photo(n, 160) for n in ("astronaut", "coffee", "rocket")])
    run_label(
        tmp_path,
        [tmp_path / "filtered" / "part-00000.parquet"],
        LabelConfig(samples_per_shard=2),
        labeler=BoxLabeler(),
    )
    return tmp_path


def test_hf_datasets_webdataset_loader_reads_every_official_field_as_raw_bytes(labelled_run):
    from datasets import load_dataset

    files = sorted(str(p) for p in (labelled_run / "brushdata").glob("*.tar"))
    # exactly how the official train_brushnet.py loads BrushData
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    rows = list(ds)
    assert len(rows) == 3
    for row in rows:
        for field in ("image", "caption", "height", "width", "segmentation"):
            assert isinstance(row[field], bytes), field
        assert row["image"][:2] == b"\xff\xd8"  # JPEG
        h, w = int(row["height"].decode()), int(row["width"].decode())
        assert (h, w) == (120, 160) or max(h, w) == 160
        seg = json.loads(row["segmentation"])
        assert len(seg["mask"]) == 1 and seg["mask"][0][0] >= 1
        assert isinstance(row["json"], dict)  # our meta: HF decodes .json; the official collate ignores it
        assert "." not in row["__key__"]


def test_validate_writes_index_with_exact_counts_and_caches(labelled_run):
    report = run_validate(labelled_run)
    assert report.ok == 3 and report.failed == 0
    index = load_index(labelled_run / "index.json")
    assert [s.num_samples for s in index.shards] == [2, 1]
    again = run_validate(labelled_run)
    assert again.ok == 0 and again.skipped == 3  # per-shard results reused


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_validate_reports_bad_samples_with_shard_and_key_and_leaves_them_out_of_the_index(
    labelled_run, caplog
):
    good = (labelled_run / "brushdata" / "p00000-00000.tar").read_bytes()
    bad = labelled_run / "brushdata" / "zbad-00000.tar"
    with tarfile.open(fileobj=io.BytesIO(good)) as src, tarfile.open(bad, "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith(".segmentation") and m.name.startswith("p00000_000000001"):
                data = json.dumps({"mask": [[1, 10**9]]}).encode()  # run past h*w
            if m.name.endswith(".height") and m.name.startswith("p00000_000000000"):
                data = b"7"
            _add(dst, m.name, data)
    report = run_validate(labelled_run)
    assert report.failed == 2 and report.details["shards_with_bad_samples"] == 1
    assert "shard=zbad-00000.tar key=p00000_000000000" in caplog.text
    assert "shard=zbad-00000.tar key=p00000_000000001" in caplog.text
    index = load_index(labelled_run / "index.json")
    assert sorted(s.path for s in index.shards) == [
        "brushdata/p00000-00000.tar",
        "brushdata/p00000-00001.tar",
    ]


def test_task_slice_from_arguments_and_slurm_environment(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert resolve_task_slice() == TaskSlice(0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    assert resolve_task_slice() == TaskSlice(2, 4)
    assert resolve_task_slice(1, 3) == TaskSlice(1, 3)  # explicit flags win
    assert TaskSlice(2, 4).select(list(range(10))) == [2, 6]
    with pytest.raises(ValueError, match="shard_index=4 num_shards=4"):
        TaskSlice(4, 4)
