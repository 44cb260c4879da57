"""End to end on loopback: real photos + broken URLs -> filter -> img2dataset -> label -> validate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from brushnet.brushdata import load_index
from data_pipeline.cli import run_chain
from data_pipeline.config import config_from_dict
from data_pipeline.download import read_stats
from data_pipeline.tools.http_server import serve_folder
from data_pipeline.tools.photos import PHOTOS, DemoRow, build_photo_site, demo_filtered_rows, write_metadata
from tests.data_pipeline.helpers import jpeg, photo

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

BROKEN = {  # url path -> expected img2dataset outcome
    "/missing.jpg": "failed_to_download",  # 404
    "/noai.jpg": "failed_to_download",  # X-Robots-Tag: noai (opt-out header check kept on)
    "/corrupt.jpg": "failed_to_resize",  # JPEG magic then garbage
    "/page.jpg": "failed_to_resize",  # HTML served where an image was expected
    "/small.jpg": "failed_to_resize",  # real photo, 200 px < min_image_size (metadata lied about its size)
}


def _broken_site(site: Path) -> list[DemoRow]:
    (site / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    (site / "page.jpg").write_text("<html><body>not an image</body></html>")
    (site / "small.jpg").write_bytes(jpeg(photo("coffee", 200)))
    (site / "noai.jpg").write_bytes(jpeg(photo("astronaut")))
    rows = [DemoRow("{base}" + path, f"broken {path}", 1024, 768) for path in BROKEN]
    rows.append(DemoRow("http://127.0.0.1:9/unreachable.jpg", "unreachable host", 1024, 768))
    return rows


def test_chain_on_loopback_counts_add_up_and_shards_load_in_hf_datasets(tmp_path):
    site = tmp_path / "site"
    rows = build_photo_site(site) + demo_filtered_rows(site) + _broken_site(site)
    cfg = config_from_dict(
        {
            "out": str(tmp_path / "run"),
            "filter": {"min_aesthetic": 5.0},
            "download": {
                "image_size": 512,
                "processes_count": 1,
                "thread_count": 8,
                "timeout": 5,
                "retry_failed_rounds": 1,
            },
            "label": {"labeler": "classical", "max_masks": 8, "samples_per_shard": 5},
        }
    )
    with serve_folder(site, headers={"/noai.jpg": {"X-Robots-Tag": "noai"}}) as base:
        cfg.metadata = [str(write_metadata(rows, base, tmp_path / "meta" / "laion.parquet"))]
        code = run_chain(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "filtered" / "_SUMMARY.json").read_text())
    n_good, n_bad = len(PHOTOS), len(BROKEN) + 1
    assert summary["kept"] == n_good + n_bad and summary["input_rows"] == len(rows)
    stats = read_stats(run / "download" / "p00000")
    assert sum(s["successes"] for s in stats) == n_good
    assert sum(s["failed_to_download"] for s in stats) == 3  # 404, noai header, unreachable
    assert sum(s["failed_to_resize"] for s in stats) == 3  # corrupt, html, too small
    retry = read_stats(run / "download" / "p00000r1")  # the `status != success` rows, retried once
    assert sum(s["count"] for s in retry) == n_bad and sum(s["successes"] for s in retry) == 0
    labelled = [json.loads(p.read_text()) for p in sorted((run / "state" / "label").glob("*.json"))]
    assert sum(r["ok"] + r["skipped"] + r["failed"] for r in labelled) == n_good
    n_ok = sum(r["ok"] for r in labelled)
    assert n_ok >= n_good - 2 and code == 0
    index = load_index(run / "index.json")
    assert sum(s.num_samples for s in index.shards) == n_ok
    assert all(p.suffix == ".tar" for p in (run / "brushdata").iterdir())

    from datasets import load_dataset

    files = sorted(str(p) for p in (run / "brushdata").glob("*.tar"))
    ds = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    rows_hf = list(ds)
    assert len(rows_hf) == n_ok
    urls = {r["json"]["url"].rsplit("/", 1)[-1] for r in rows_hf}
    assert urls <= {f"{name}.jpg" for name, _ in PHOTOS}
    for r in rows_hf:
        assert all(isinstance(r[f], bytes) for f in ("image", "caption", "height", "width", "segmentation"))
        assert max(int(r["height"]), int(r["width"])) >= 512 and min(int(r["height"]), int(r["width"])) == 512

    again = run_chain(cfg)  # everything done: every stage skips
    assert again == 0
    assert sorted(p.name for p in (run / "brushdata").iterdir()) == [Path(f).name for f in files]


def test_demo_command_builds_an_indexed_brushdata_set(tmp_path):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "demo", "--out", str(tmp_path / "demo")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CLASSICAL" in proc.stderr  # the loud fallback line
    index = load_index(tmp_path / "demo" / "index.json")
    assert sum(s.num_samples for s in index.shards) >= 5
    assert "index_samples" in proc.stdout
