"""``make demo FAMILY=sd3|flux``: trains a DiT branch offline, measures it on held-out crops, resumes, and
prints an inpaint command that works as printed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _make_demo(family: str, out: Path, steps: int) -> subprocess.CompletedProcess:
    args = f"--out {out} --steps {steps}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["make", "--no-print-directory", "demo", f"FAMILY={family}", f"DEMO_ARGS={args}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_demo_learns_resumes_and_prints_a_working_inpaint_command(tmp_path, family):
    out = tmp_path / "demo"
    done = _make_demo(family, out, steps=12)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((out / "results.json").read_text())
    assert first["family"] == family and first["export"].endswith("step-00000012/brushnet")
    # the trained branch lowers the held-out loss of the same noise draws (the untrained one is the base)
    assert first["held_out_loss_trained_branch"] < 0.95 * first["held_out_loss_untrained_branch"]
    assert (out / "inpainted.png").is_file()

    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("inpaint again:")]
    inpaint = subprocess.run(
        shlex.split(line.split(":", 1)[1]), capture_output=True, text=True, timeout=300, check=False
    )
    assert inpaint.returncode == 0, inpaint.stderr[-2000:]
    assert (out / "out.png").is_file()

    again = _make_demo(family, out, steps=16)  # "train more": continues the same run from step 12
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "results.json").read_text())
    assert second["export"].endswith("step-00000016/brushnet")
    assert "(global step 12)" in again.stderr  # resumed from the first run's last step, not restarted
