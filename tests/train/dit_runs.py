"""Helpers for the DiT (SD3 / Flux) training tests: trainable tiny bases and the installed ``brushnet-train``."""

from __future__ import annotations

import csv
import statistics
import subprocess
from pathlib import Path

from brushnet.testing.tiny_dit_heads import build_trainable_dit_base
from tests.train.checkpoint_runs import BRUSHNET_TRAIN, ROOT, _env

CONFIGS = ROOT / "configs"
FAMILIES = ("sd3", "flux")


def dit_base(tmp_path_factory, family: str) -> Path:
    return build_trainable_dit_base(family, tmp_path_factory.mktemp(f"dit-{family}") / family)


def brushnet_train(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``brushnet-train fit ARGS`` (the installed console script) from the repository root."""
    return subprocess.run(
        [str(BRUSHNET_TRAIN), "fit", *args],
        cwd=ROOT,
        env=_env(),
        timeout=timeout,
        capture_output=True,
        text=True,
    )


def losses(run: Path) -> list[float]:
    """``train/loss`` per logged step from the run's CSV log."""
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    with open(metrics) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def window_means(values: list[float], width: int) -> list[float]:
    return [statistics.mean(values[i : i + width]) for i in range(0, len(values), width)]
