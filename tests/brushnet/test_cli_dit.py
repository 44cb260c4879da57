"""`brushnet inpaint --base <SD3 / Flux folder>` as a user runs it (the installed console script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.dit.family import FAMILIES, pipeline_class
from brushnet.testing.tiny_dit import build_tiny_flux_base, build_tiny_sd3_base

BRUSHNET = Path(sys.executable).with_name("brushnet")
H, W = 48, 64
BUILDERS = {"sd3": build_tiny_sd3_base, "flux": build_tiny_flux_base}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request, tmp_path_factory) -> dict:
    """A tiny base, a branch with non-zero (random) weights, an image and its mask."""
    family, root = request.param, tmp_path_factory.mktemp(f"cli-{request.param}")
    base = BUILDERS[family](root / "base")
    from diffusers import DiffusionPipeline

    transformer = DiffusionPipeline.from_pretrained(base).transformer
    branch = FAMILIES[family].build_branch(transformer, num_layers=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    branch.save_pretrained(root / "branch")
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[12:36, 16:48] = 255  # white = inpaint
    Image.fromarray(rgb).save(root / "image.png")
    Image.fromarray(mask).save(root / "mask.png")
    return dict(
        family=family, base=base, branch=root / "branch", image=root / "image.png", mask=root / "mask.png"
    )


def brushnet(case: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "inpaint",
        "--base", str(case["base"]),
        "--brushnet", str(case["branch"]),
        "--image", str(case["image"]),
        "--mask", str(case["mask"]),
        "--prompt", "a red ball",
        "--out", str(out),
        "--steps", "2",
        "--seed", "0",
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    return subprocess.run(
        [str(BRUSHNET), *args, "--threads", "1"], env=env, capture_output=True, text=True, timeout=300
    )


def test_inpaint_on_a_dit_base_is_the_family_pipeline(case, tmp_path):
    out = tmp_path / "out.png"
    done = brushnet(case, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {out}" in done.stdout
    with Image.open(out) as im:
        result = np.asarray(im.convert("RGB"))
    assert result.shape == (H, W, 3)
    pipe = pipeline_class(case["family"]).from_base(case["base"], case["branch"])
    expected = pipe(
        "a red ball",
        case["image"],
        case["mask"],
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]
    assert np.abs(result.astype(int) - expected).max() <= 1  # the same pipeline, defaults and seed
    image = np.asarray(Image.open(case["image"]).convert("RGB"))
    assert np.array_equal(result[:1], image[:1])  # far from the hole: the input, pasted back
    assert not np.array_equal(result[12:36, 16:48], image[12:36, 16:48])  # the hole is generated


def test_unet_only_options_on_a_dit_base_are_one_line(case, tmp_path):
    done = brushnet(case, tmp_path / "out.png", "--scheduler", "ddim")
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert f"is a {case['family']} base" in line and "--scheduler" in line
    assert "Traceback" not in done.stderr and not (tmp_path / "out.png").exists()


def test_evaluate_generates_with_the_dit_pipeline_and_records_its_settings(case, tmp_path):
    """``brushnet evaluate`` on a DiT base: exit 0, images generated and scored, the family's settings
    recorded; a UNet-only choice is one line, exit 2."""
    if case["family"] == "sd3":
        pytest.skip("the tiny SD3's positional table covers 256 px; fake_benchmark's photos are 512 px")
    import json

    from tests.brushnet.evaluation_builders import fake_benchmark

    bench = fake_benchmark(tmp_path / "bench", n=1)
    out = tmp_path / "eval"
    argv = ["evaluate", "--benchmark", str(bench), "--out", str(out), "--base", str(case["base"])]
    argv += ["--brushnet", str(case["branch"]), "--steps", "2", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1")
    done = subprocess.run([str(BRUSHNET), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((out / "generation.json").read_text())
    assert (settings["scheduler"], settings["masked_image_encoding"]) == ("flow_match_euler", "once")
    assert (settings["steps"], settings["guidance"]) == (2, 3.5)
    generated = [p for p in out.rglob("*.png") if "masked" not in p.name]
    assert generated, sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    bad = subprocess.run(
        [str(BRUSHNET), *argv, "--scheduler", "ddim"], env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and "is a flux base: --scheduler ddim" in bad.stderr.strip().splitlines()[-1]
