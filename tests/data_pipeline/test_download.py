"""Download stage: the real img2dataset on a loopback server, and the stage's bookkeeping (retry rounds, task
split, skips) with img2dataset replaced by a fake."""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd
import pytest
from PIL import Image

from data_pipeline import download as dl
from data_pipeline.config import DownloadConfig
from data_pipeline.layout import AESTHETIC, CAPTION, EXTRA_COLUMNS, PUNSAFE, PWATERMARK, URL, RunLayout
from data_pipeline.sharding import TaskSlice
from data_pipeline.tools.http_server import serve_folder
from tests.data_pipeline.helpers import jpeg, photo


@pytest.mark.slow  # ~40 s: two img2dataset runs (worker pool start-up)
def test_img2dataset_on_loopback_resizes_keeps_columns_and_honours_opt_outs(tmp_path):
    """The real img2dataset with our options, against a loopback server: what the options must produce."""
    site = tmp_path / "site"
    site.mkdir()
    files = {  # name -> (image, expected outcome)
        "rocket.jpg": (photo("rocket"), "success"),  # 427x640: smaller side resized to 256, ratio kept
        "small.jpg": (photo("coffee", 200), "success"),  # 133x200: between min size and size, kept as is
        "tiny.jpg": (photo("camera", 100), "failed_to_resize"),  # 100x100 < min_image_size
        "ours-noai.jpg": (photo("chelsea"), "failed_to_download"),  # X-Robots-Tag for our user agent token
        "other-noai.jpg": (photo("chelsea"), "success"),  # X-Robots-Tag for another crawler only
    }
    for name, (image, _) in files.items():
        (site / name).write_bytes(jpeg(image))
    headers = {
        "/ours-noai.jpg": {"X-Robots-Tag": "brushnet-train: noai"},
        "/other-noai.jpg": {"X-Robots-Tag": "otherbot: noai"},
    }
    names = [*files, "missing.jpg"]  # 404
    cfg = DownloadConfig(image_size=256, min_image_size=128, processes_count=1, thread_count=4, timeout=5)
    part = tmp_path / "filtered" / "part-00000.parquet"
    part.parent.mkdir()
    with serve_folder(site, headers=headers) as base:
        pd.DataFrame(
            {
                URL: [f"{base}/{n}" for n in names],
                CAPTION: [f"caption of {n}" for n in names],
                AESTHETIC: [6.0 + i / 10 for i in range(len(names))],
                PUNSAFE: [0.01] * len(names),
                PWATERMARK: [0.2] * len(names),
                "width": [1.0] * len(names),  # filter-stage columns img2dataset does not keep
                "height": [1.0] * len(names),
            }
        ).to_parquet(part, index=False)
        report = dl.run_download([part], tmp_path, cfg)
    assert (report.ok, report.failed) == (3, 3)
    reasons = {k: n for k, n in report.details.items() if k.startswith("failed: ")}
    assert sorted(reasons.values()) == [1, 1, 1]  # img2dataset's wording: opt-out header, 404, too small
    assert any("X-Robots-Tag" in k for k in reasons) and any("404" in k for k in reasons)
    folder = tmp_path / "download" / "p00000"
    status = pd.concat([pd.read_parquet(p) for p in folder.glob("*.parquet")])
    outcome = {u.rsplit("/", 1)[1]: s for u, s in zip(status[URL], status["status"])}
    expected = {n: o for n, (_, o) in files.items()} | {"missing.jpg": "failed_to_download"}
    assert outcome == expected
    assert RunLayout(tmp_path).read_record("download", "p00000")["successes"] == 3

    reference = Image.open(io.BytesIO(jpeg(photo("rocket"), quality=95)))
    tars = sorted(folder.glob("*.tar"))
    with tarfile.open(tars[0]) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    keys = sorted({n.split(".")[0] for n in members})
    assert len(keys) == 3 and all(f"{k}.{ext}" in members for k in keys for ext in ("jpg", "txt", "json"))
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        name = meta["url"].rsplit("/", 1)[1]
        assert members[f"{key}.txt"].decode() == f"caption of {name}"
        assert meta[AESTHETIC] == 6.0 + names.index(name) / 10 and meta[PWATERMARK] == 0.2
        with Image.open(io.BytesIO(members[f"{key}.jpg"])) as im:
            assert im.format == "JPEG" and im.quantization == reference.quantization  # quality 95
            w, h = im.size
        source_h, source_w = files[name][0].shape[:2]
        if min(source_h, source_w) > 256:  # keep_ratio: smaller side -> image_size, aspect ratio kept
            assert min(w, h) == 256 and abs(w / h - source_w / source_h) < 0.01
        else:  # resize_only_if_bigger
            assert (w, h) == (source_w, source_h)

    # incremental mode: a rerun (server gone) skips the finished shard instead of downloading it again
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    dl.run_img2dataset(dl.DownloadUnit("p00000", part, folder), cfg)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def _fake_img2dataset(calls):
    """Writes what img2dataset leaves per shard (status parquet + stats); URLs containing 'bad' fail."""

    def run(unit, cfg):
        calls.append(unit.name)
        rows = pd.read_parquet(unit.input)
        unit.folder.mkdir(parents=True, exist_ok=True)
        status = ["failed_to_download" if "bad" in u else "success" for u in rows["url"]]
        pd.DataFrame({**{c: rows[c] for c in rows.columns}, "status": status}).to_parquet(
            unit.folder / "00000.parquet"
        )
        ok = status.count("success")
        stats = {
            "count": len(rows),
            "successes": ok,
            "failed_to_download": len(rows) - ok,
            "failed_to_resize": 0,
            "status_dict": {"success": ok, "404": len(rows) - ok},
        }
        (unit.folder / "00000_stats.json").write_text(json.dumps(stats))

    return run


def test_download_skips_done_parts_retries_failed_rows_and_splits_by_task(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(dl, "run_img2dataset", _fake_img2dataset(calls))
    parts = []
    for i, urls in enumerate([["good1", "bad1", "good2", "bad2"], ["good3"]]):
        parts.append(tmp_path / "filtered" / f"part-{i:05d}.parquet")
        parts[-1].parent.mkdir(exist_ok=True)
        pd.DataFrame(
            {"url": urls, "caption": urls, **{c: [0.1] * len(urls) for c in EXTRA_COLUMNS}}
        ).to_parquet(parts[-1])
    cfg = DownloadConfig(retry_failed_rounds=1)
    report = dl.run_download(parts, tmp_path, cfg, TaskSlice(0, 2))
    assert calls == ["p00000", "p00000r1"]
    assert report.ok == 2 and report.failed == 4 and report.details["retried_rows"] == 2
    assert report.details["failed: 404"] == 4
    retry_rows = pd.read_parquet(tmp_path / "download" / "_retry" / "p00000r1.parquet")
    assert retry_rows["url"].tolist() == ["bad1", "bad2"]
    assert list(retry_rows.columns) == ["url", "caption", *EXTRA_COLUMNS]
    assert [p.name for p in RunLayout(tmp_path).download_folders("p00000")] == ["p00000", "p00000r1"]
    done = json.loads((tmp_path / "state" / "download" / "p00000.json").read_text())
    assert done["successes"] == 2 and done["shards"] == 1

    again = dl.run_download(parts, tmp_path, cfg)  # whole job: part 0 done, part 1 new
    assert calls == ["p00000", "p00000r1", "p00001"]
    assert again.skipped == 2 and again.ok == 1
