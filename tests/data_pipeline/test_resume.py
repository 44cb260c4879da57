"""Resume: kill the label stage (a real subprocess, SIGKILL) in the middle of a shard, rerun, complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from brushnet.brushdata import scan_shard
from data_pipeline.validate import run_validate
from tests.data_pipeline.helpers import PHOTO_NAMES, photo, write_download_unit

REPO = Path(__file__).resolve().parents[2]


def _label_cmd(run_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "label", "--config", str(config), "--out", str(run_dir)]


def test_label_killed_mid_shard_leaves_no_partial_shard_and_rerun_completes(tmp_path):
    images = [photo(n, 256) for n in PHOTO_NAMES] * 2  # 12 images, one output shard
    keys = write_download_unit(tmp_path, images)
    config = tmp_path / "label.yaml"
    config.write_text("label:\n  labeler: classical\n  min_area_frac: 0.0\n  samples_per_shard: 100\n")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}
    shard_dir = tmp_path / "brushdata"
    proc = subprocess.Popen(
        _label_cmd(tmp_path, config), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(shard_dir.glob("*.tar.tmp-*"))
            if partial and partial[0].stat().st_size > 80_000:  # a few samples are in the shard
                break
            time.sleep(0.02)
        assert proc.poll() is None, "label finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(shard_dir.glob("*.tar")) == []  # nothing visible under the official `*.tar` glob
    assert len(list(shard_dir.glob("*.tar.tmp-*"))) == 1

    rerun = subprocess.run(
        _label_cmd(tmp_path, config), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in shard_dir.iterdir()) == ["p00000-00000.tar"]  # temp of the killed run gone
    records = scan_shard(shard_dir / "p00000-00000.tar")
    assert [r.key for r in records] == [f"p00000_{k}" for k in keys]
    assert run_validate(tmp_path).failed == 0
    assert "shards_written: 1" in rerun.stdout
