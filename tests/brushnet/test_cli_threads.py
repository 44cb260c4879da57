"""``brushnet inpaint --threads``: run by the installed console script, as the demo prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from brushnet.testing.tiny_base import pretrained_tiny_base

BRUSHNET = Path(sys.executable).parent / "brushnet"


def _inputs(tmp_path: Path) -> list[str]:
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    PIL.Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    hole = np.zeros((32, 32), np.uint8)
    hole[8:24, 8:24] = 255
    PIL.Image.fromarray(hole).save(mask)
    return [
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--prompt",
        "a cat",
        "--out",
        str(tmp_path / "out.png"),
    ]


def test_bad_threads_fails_in_one_line_before_loading(tmp_path):
    """The working path (``--threads 1`` at 64 px in seconds) is run by the demo's slow test, as printed."""
    cmd = [str(BRUSHNET), "inpaint", "--base", str(pretrained_tiny_base()), "--brushnet", str(tmp_path)]
    bad = subprocess.run(
        [*cmd, *_inputs(tmp_path), "--threads", "0"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "--threads must be at least 1, got 0" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "out.png").exists()
