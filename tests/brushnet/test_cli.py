"""`brushnet inpaint` end to end on tiny random base and branch folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brushnet.cli import main
from tests.brushnet.branches import save_branch

H, W = 64, 48


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_base_sd15, tiny_base_sdxl) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[24:40, 16:32] = 255  # white = inpaint
    Image.fromarray(rgb).save(root / "image.png")
    Image.fromarray(mask).save(root / "mask.png")
    return {
        "image": root / "image.png",
        "mask": root / "mask.png",
        "base": tiny_base_sd15,
        "branch": save_branch(tiny_base_sd15, root / "branch-sd15", seed=1),
        "branch_sdxl": save_branch(tiny_base_sdxl, root / "branch-sdxl", seed=1),
    }


def _args(inputs: dict[str, Path], out: Path, *extra: str, **override: Path) -> list[str]:
    paths = {**inputs, **override}
    return [
        "inpaint",
        "--base", str(paths["base"]),
        "--brushnet", str(paths["branch"]),
        "--image", str(paths["image"]),
        "--mask", str(paths["mask"]),
        "--prompt", "a red ball",
        "--out", str(out),
        "--steps", "2",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_inpaint_writes_png_and_blends(inputs, tmp_path, capsys):
    out = tmp_path / "sub" / "out.png"
    assert main(_args(inputs, out, "--scheduler", "ddim")) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (W, H)
        result = np.asarray(im.convert("RGB"))
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no temporary left behind
    original = np.asarray(Image.open(inputs["image"]).convert("RGB"))
    far = np.ones((H, W), bool)
    far[24 - 11 : 40 + 11, 16 - 11 : 32 + 11] = False
    np.testing.assert_array_equal(result[far], original[far])

    raw = tmp_path / "raw.png"
    assert main(_args(inputs, raw, "--scheduler", "ddim", "--no-blend")) == 0
    assert not np.array_equal(np.asarray(Image.open(raw).convert("RGB"))[far], original[far])


def test_same_seed_same_image(inputs, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(_args(inputs, a)) == 0
    assert main(_args(inputs, b)) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize(
    ("extra", "override", "message"),
    [
        ((), {"mask": Path("/nonexistent/mask.png")}, "--mask '/nonexistent/mask.png' does not exist"),
        ((), {"image": Path("/nonexistent/im.png")}, "--image '/nonexistent/im.png' does not exist"),
        ((), {"branch": Path("/nonexistent/branch")}, "BrushNet folder '/nonexistent/branch' does not exist"),
        ((), {"base": Path("/nonexistent/base")}, "/nonexistent/base"),
        (
            (),
            {"branch": Path("someone/no-such-brushnet")},
            "'someone/no-such-brushnet' is not a local folder",
        ),
        (("--blur-size", "20"), {}, "--blur-size must be odd, or 0 for a hard paste; got 20"),
        (("--scheduler", "bogus"), {}, "unknown scheduler 'bogus'"),
    ],
)
def test_bad_inputs_fail_clearly(inputs, tmp_path, capsys, extra, override, message):
    out = tmp_path / "out.png"
    assert main(_args(inputs, out, *extra, **override)) == 2
    err = capsys.readouterr().err
    assert "brushnet: error:" in err and message in err
    assert not out.exists()


def test_mismatched_branch_names_both(inputs, tmp_path, capsys):
    assert main(_args(inputs, tmp_path / "o.png", branch=inputs["branch_sdxl"])) == 2
    err = capsys.readouterr().err
    assert str(inputs["branch_sdxl"]) in err and "addition_embed_type" in err and "unet" in err


def test_unknown_output_format(inputs, tmp_path, capsys):
    assert main(_args(inputs, tmp_path / "out.notanimage")) == 2
    assert "unknown image format '.notanimage'" in capsys.readouterr().err


def test_console_script_subprocess(inputs, tmp_path):
    out = tmp_path / "out.png"
    script = Path(sys.executable).with_name("brushnet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "brushnet.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, *_args(inputs, out)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.size == (W, H)
