"""Filter stage: per-filter counts, configurable columns (v1/v2), dedupe, shuffle, bad metadata."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_pipeline.config import ConfigError, FilterConfig, config_from_dict
from data_pipeline.filter import MetadataError, run_filter
from data_pipeline.layout import list_parts
from tests.data_pipeline.helpers import laion_v2_frame


def _read_parts(folder):
    return pd.concat([pd.read_parquet(p) for p in list_parts(folder)], ignore_index=True)


def test_filter_counts_every_filter_and_keeps_the_rest(tmp_path):
    df = laion_v2_frame(10)
    df.loc[0, "AESTHETIC_SCORE"] = 5.0
    df.loc[1, "punsafe"] = 0.7
    df.loc[2, "pwatermark"] = 0.9
    df.loc[3, ["WIDTH", "HEIGHT"]] = [800.0, 300.0]  # short side 300 < 512
    df.loc[4, ["WIDTH", "HEIGHT"]] = [4000.0, 600.0]  # aspect 6.7 > 3
    df.loc[5, "URL"] = df.loc[6, "URL"]  # duplicate url: row 5 comes first and stays
    df.loc[7, "hash"] = df.loc[8, "hash"]  # duplicate hash
    df.loc[9, "URL"] = None
    df.to_parquet(tmp_path / "meta.parquet")
    report = run_filter(
        [str(tmp_path / "meta.parquet")], tmp_path / "filtered", FilterConfig(rows_per_part=2)
    )
    d = report.details
    assert [
        d[f"dropped_{k}"]
        for k in (
            "missing_url",
            "aesthetic",
            "punsafe",
            "pwatermark",
            "min_side",
            "aspect_ratio",
            "duplicate_url",
            "duplicate_hash",
        )
    ] == [1, 1, 1, 1, 1, 1, 1, 1]
    assert report.ok == 2 and report.skipped == 8
    out = _read_parts(tmp_path / "filtered")
    assert sorted(out["caption"]) == ["caption 5", "caption 7"]
    assert list(out.columns[:5]) == ["url", "caption", "aesthetic_score", "punsafe", "pwatermark"]
    assert len(list_parts(tmp_path / "filtered")) == 1
    summary = json.loads((tmp_path / "filtered" / "_SUMMARY.json").read_text())
    assert summary["kept"] == 2 and summary["input_rows"] == 10


def test_filter_is_deterministic_split_into_parts_and_skips_when_done(tmp_path):
    laion_v2_frame(25).to_parquet(tmp_path / "a.parquet")
    laion_v2_frame(5, URL=[f"http://other/{i}" for i in range(5)], hash=list(range(5))).to_parquet(
        tmp_path / "b.parquet"
    )
    cfg = FilterConfig(rows_per_part=10, seed=3)
    run_filter([str(tmp_path)], tmp_path / "f1", cfg)
    run_filter([str(tmp_path / "*.parquet")], tmp_path / "f2", cfg)
    one, two = _read_parts(tmp_path / "f1"), _read_parts(tmp_path / "f2")
    assert [len(pd.read_parquet(p)) for p in list_parts(tmp_path / "f1")] == [10, 10, 10]
    assert one["url"].tolist() == two["url"].tolist()
    assert one["url"].tolist() != sorted(one["url"].tolist())  # shuffled
    again = run_filter([str(tmp_path)], tmp_path / "f1", cfg)
    assert again.ok == 0 and again.skipped == 30  # already complete: nothing redone


def test_v1_lowercase_aesthetic_column_via_config(tmp_path):
    df = laion_v2_frame(4).rename(columns={"AESTHETIC_SCORE": "aesthetic"})
    df.loc[0, "aesthetic"] = 1.0
    df.to_parquet(tmp_path / "v1.parquet")
    cfg = config_from_dict({"filter": {"columns": {"aesthetic": "aesthetic", "pwatermark": None}}}).filter
    report = run_filter([str(tmp_path / "v1.parquet")], tmp_path / "out", cfg)
    assert report.ok == 3 and report.details["dropped_aesthetic"] == 1
    assert "dropped_pwatermark" not in report.details


def test_missing_column_names_column_and_file(tmp_path):
    laion_v2_frame(3).drop(columns=["punsafe"]).to_parquet(tmp_path / "nopunsafe.parquet")
    with pytest.raises(
        MetadataError, match=r"nopunsafe\.parquet: column 'punsafe' \(filter\.columns\.punsafe\)"
    ):
        run_filter([str(tmp_path / "nopunsafe.parquet")], tmp_path / "out", FilterConfig())
    assert not (tmp_path / "out").exists()


def test_empty_parquet_and_missing_paths_are_clear_errors(tmp_path):
    laion_v2_frame(0).to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(MetadataError, match=r"no rows.*empty\.parquet"):
        run_filter([str(tmp_path / "empty.parquet")], tmp_path / "out", FilterConfig())
    with pytest.raises(MetadataError, match="matches no parquet"):
        run_filter([str(tmp_path / "nope-*.parquet")], tmp_path / "out", FilterConfig())
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(MetadataError, match=r"junk\.parquet: not a readable parquet"):
        run_filter([str(tmp_path / "junk.parquet")], tmp_path / "out", FilterConfig())
    assert not (tmp_path / "out").exists()


def test_config_rejects_unknown_keys_with_their_path():
    with pytest.raises(ConfigError, match=r"^config: .*'download' does not accept option 'thread'"):
        config_from_dict({"download": {"thread": 3}})
    with pytest.raises(ConfigError, match=r"label\.labeler.*'auto', 'sam', 'classical'.*magic"):
        config_from_dict({"label": {"labeler": "magic"}})


def test_cli_filter_reports_bad_metadata_and_prints_the_summary(tmp_path, capsys):
    from data_pipeline.cli import main

    laion_v2_frame(3).drop(columns=["hash"]).to_parquet(tmp_path / "nohash.parquet")
    code = main(["filter", "--out", str(tmp_path / "run"), "--metadata", str(tmp_path / "nohash.parquet")])
    assert code == 2 and "column 'hash' (filter.columns.hash) not found" in capsys.readouterr().err
    laion_v2_frame(3).to_parquet(tmp_path / "ok.parquet")
    code = main(["filter", "--out", str(tmp_path / "run"), "--metadata", str(tmp_path / "ok.parquet")])
    out = capsys.readouterr().out
    assert code == 0 and "filter" in out and "dropped_aesthetic: 0" in out
    assert len(list_parts(tmp_path / "run" / "filtered")) == 1
