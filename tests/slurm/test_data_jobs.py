"""slurm/label.sh as a real array job: 2 tasks over 4 downloaded parts write every shard exactly once."""

from __future__ import annotations

import json
import re
import tarfile

import pytest

from tests.data_pipeline.helpers import PHOTO_NAMES, photo, write_download_unit
from tests.slurm.conftest import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_label_array_two_tasks_over_four_parts(slurm, tmp_path):
    run = tmp_path / "run"
    images = [photo(name, max_side=64) for name in PHOTO_NAMES[:2]]
    parts = [f"p{k:05d}" for k in range(4)]
    source_keys = {p: write_download_unit(run, images, name=p) for p in parts}
    logs = tmp_path / "logs"
    logs.mkdir()
    env = slurm.env(DATA_OUT=str(run), LABELER="classical")
    job = slurm.sbatch(
        "--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
        f"--output={logs}/%A_%a.out", str(REPO / "slurm" / "label.sh"), env=env,
    )  # fmt: skip
    infos = slurm.wait(job, timeout=240)
    outs = {p.name: p.read_text() for p in logs.iterdir()}
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], outs

    # each task ran with its own slice of the array
    slices = sorted(re.search(r"task (\d+)/(\d+)", text).groups() for text in outs.values())
    assert slices == [("0", "2"), ("1", "2")]
    # every part's shard exists once, holding every source sample once
    shards = sorted(p.name for p in (run / "brushdata").iterdir())
    assert shards == [f"{p}-00000.tar" for p in parts]
    for p in parts:
        with tarfile.open(run / "brushdata" / f"{p}-00000.tar") as tf:
            keys = sorted({m.name.split(".")[0] for m in tf.getmembers()})
        assert keys == sorted(f"{p}_{k}" for k in source_keys[p])
    # ... written by exactly one task: part i belongs to task i % 2, and the written counts add up to 4
    written = [int(m) for text in outs.values() for m in re.findall(r"shards_written\D+(\d+)", text)]
    assert sorted(written) == [2, 2], outs
    records = {p: json.loads((run / "state" / "label" / f"{p}-00000.json").read_text()) for p in parts}
    assert all(r["ok"] == len(images) for r in records.values())
