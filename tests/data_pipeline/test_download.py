"""Download stage bookkeeping (fast; the real img2dataset on loopback runs in test_end_to_end.py)."""

from __future__ import annotations

import json

import pandas as pd

from data_pipeline import download as dl
from data_pipeline.config import DownloadConfig
from data_pipeline.layout import EXTRA_COLUMNS, RunLayout
from data_pipeline.sharding import TaskSlice


def test_img2dataset_gets_the_required_options(tmp_path, monkeypatch):
    import img2dataset

    seen = {}
    monkeypatch.setattr(img2dataset, "download", lambda **kw: seen.update(kw))
    unit = dl.DownloadUnit("p00000", tmp_path / "part-00000.parquet", tmp_path / "out")
    dl.run_img2dataset(unit, DownloadConfig())
    assert seen["resize_mode"] == "keep_ratio" and seen["resize_only_if_bigger"] is True
    assert seen["encode_quality"] == 95 and seen["encode_format"] == "jpg"
    assert seen["output_format"] == "webdataset" and seen["incremental_mode"] == "incremental"
    assert seen["min_image_size"] == 512 and seen["number_sample_per_shard"] == 10_000
    assert seen["save_additional_columns"] == ["aesthetic_score", "punsafe", "pwatermark"]
    assert seen["user_agent_token"] and "noai" in seen["disallowed_header_directives"]
    assert (seen["url_col"], seen["caption_col"], seen["input_format"]) == ("url", "caption", "parquet")


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
