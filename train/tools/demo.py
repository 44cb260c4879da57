"""``make demo``: the whole training path offline on CPU in a few minutes.

1. a tiny random base model with the real CLIP BPE vocabulary (``brushnet.testing.tiny.build_tiny_base``), or the
   base given with ``--base`` (``make demo BASE=<hub id or folder>``);
2. a small BrushData set of real photographs from ``skimage.data``: through the data pipeline's own CLI
   (``python -m data_pipeline demo``) when it is installed, else written here with classical masks;
3. ``brushnet-train fit --config configs/tiny_cpu.yaml`` with those paths: a few hundred steps, checkpoints,
   diffusers exports of the branch and its EMA, validation grids;
4. a summary of where everything is.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("train.tools.demo")

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
PHOTOS = {
    "astronaut": "an astronaut in a white suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat",
    "rocket": "a rocket on a launch pad",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained cells under a microscope",
    "cat": "a cat looking at the camera",
    "retina": "a photograph of a retina",
    "motorcycle_left": "a red motorcycle",
    "colorwheel": "a colour wheel",
}


def _photo(name: str, size: int) -> np.ndarray | None:
    import PIL.Image
    import skimage.data

    try:
        arr = np.asarray(getattr(skimage.data, name)())
    except Exception:  # some photos need pooch downloads; skip what is not shipped
        return None
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    arr = arr[..., :3].astype(np.uint8)
    image = PIL.Image.fromarray(arr)
    scale = size / min(image.size)
    return np.asarray(
        image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.BICUBIC)
    )


def classical_masks(rgb: np.ndarray, max_masks: int = 4) -> list[np.ndarray]:
    """Object-like masks without a segmentation model: Otsu foreground/background regions + an ellipse."""
    from skimage.color import rgb2gray
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    gray = rgb2gray(rgb)
    h, w = gray.shape
    masks = []
    fg = gray > threshold_otsu(gray)
    for binary in (fg, ~fg):
        regions = label(binary)
        sizes = np.bincount(regions.ravel())[1:]
        for idx in np.argsort(sizes)[::-1][:2]:
            m = regions == idx + 1
            if 0.02 < m.mean() < 0.8:
                masks.append(m)
    yy, xx = np.mgrid[:h, :w]
    masks.append(((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2 <= 1)
    return masks[:max_masks]


def write_demo_shards(folder: Path, size: int = 256, repeats: int = 4) -> Path:
    """BrushData shards of skimage photos (each photo ``repeats`` times) written with ``ShardWriter``."""
    import PIL.Image

    from brushnet.brushdata import BrushDataSample, ShardWriter
    from brushnet.masks import brushdata_rle_encode

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with ShardWriter(folder, "demo-000000") as writer:
        for r in range(repeats):
            for name, caption in PHOTOS.items():
                rgb = _photo(name, size)
                if rgb is None:
                    continue
                buf = io.BytesIO()
                PIL.Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
                writer.write(
                    BrushDataSample(
                        key=f"{name}_{r}",
                        image=buf.getvalue(),
                        caption=caption,
                        height=rgb.shape[0],
                        width=rgb.shape[1],
                        masks=[brushdata_rle_encode(m) for m in classical_masks(rgb)],
                        meta={"source": f"skimage.data.{name}"},
                    )
                )
                n += 1
    log.info("wrote %d demo samples to %s", n, folder)
    return folder


def build_data(out: Path, timeout_s: float = 240.0) -> list[str]:
    """CLI arguments pointing the DataModule at the demo data (built now if missing)."""
    pipeline_out = out / "data_pipeline"
    if (pipeline_out / "index.json").is_file():
        return ["--data.index", str(pipeline_out / "index.json")]
    shards = out / "data" / "shards"
    if any(shards.glob("*.tar")):
        return ["--data.train_shards", str(shards)]
    if importlib.util.find_spec("data_pipeline") is not None:  # its CLI, in a subprocess (no import)
        cmd = [sys.executable, "-m", "data_pipeline", "demo", "--out", str(pipeline_out)]
        log.info("building the demo data set with the data pipeline: %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, timeout=timeout_s, check=False)
            if done.returncode == 0 and (pipeline_out / "index.json").is_file():
                return ["--data.index", str(pipeline_out / "index.json")]
            log.warning("the data pipeline demo failed (exit %s); writing shards directly", done.returncode)
        except subprocess.TimeoutExpired:
            log.warning("the data pipeline demo took more than %.0f s; writing shards directly", timeout_s)
    write_demo_shards(shards)
    return ["--data.train_shards", str(shards)]


def build_base(out: Path, base: str | None) -> str:
    if base:
        return base
    from brushnet.testing.tiny import build_tiny_base

    folder = out / "base"
    if not (folder / "model_index.json").is_file():
        log.info("building a tiny random base model with the real CLIP vocabulary at %s", folder)
        build_tiny_base(folder, kind="sd15", vocab="clip")
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo"), help="where everything goes (default: demo/)"
    )
    parser.add_argument(
        "--base", default=os.environ.get("BASE") or None, help="hub id or folder of a real base"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: tiny_cpu.yaml's 300)"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="default 64 (tiny base), 512 with --base"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 for the tiny CPU demo, torch's default with --base)",
    )
    parser.add_argument("extra", nargs="*", help="more LightningCLI arguments, e.g. --trainer.max_steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    threads = args.threads or (None if args.base else 1)
    if threads:
        # The tiny model's ops are far too small to gain from intra-op parallelism: with torch's default
        # (one thread per core) on a 2-core machine that is also busy, every op waits at OpenMP barriers for
        # a descheduled thread, measured at 2-8 s per step instead of 0.12 s with one thread.
        import torch

        torch.set_num_threads(threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = build_base(out, args.base)
    data_args = build_data(out)
    run = out / "run"
    shutil.rmtree(run, ignore_errors=True)  # every demo run starts fresh
    resolution = args.resolution or (512 if args.base else 64)
    cli_args = [
        "--config",
        str(TINY_CONFIG),
        "--model.pretrained_model_name_or_path",
        base,
        *data_args,
        f"--data.resolution={resolution}",
        f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}",
        *(["--data.train_shards=null"] if data_args[0] == "--data.index" else []),
        *([f"--trainer.max_steps={args.steps}"] if args.steps else []),
        *(["--trainer.accelerator=auto"] if args.base else []),
        *args.extra,
    ]
    from train.cli import main as cli_main
    from train.validation import ValidationGrids

    cli = cli_main(cli_args, run=False)
    trainer = cli.trainer
    for cb in trainer.callbacks:  # validation grids at the demo's resolution
        if isinstance(cb, ValidationGrids):
            cb.resolution = resolution
    trainer.fit(cli.model, datamodule=cli.datamodule)
    ckpt = trainer.checkpoint_callback
    grids = sorted({str(p.parent) for cb in trainer.callbacks for p in getattr(cb, "written", [])})
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    print("\n=== BrushNet demo finished in %.0f s ===" % (time.perf_counter() - start))
    print(f"base model          : {base}")
    print(f"training data       : {' '.join(data_args)}")
    print(f"steps               : {trainer.global_step}")
    print(f"final metrics       : {metrics}")
    print(f"resolved config     : {Path(trainer.log_dir or run) / 'config.yaml'}")
    print(f"logs (CSV)          : {trainer.log_dir}")
    print(f"last checkpoint     : {getattr(ckpt, 'last_model_path', None)}")
    print(f"exported branch     : {getattr(ckpt, 'last_export', None)} (brushnet/, brushnet_ema/)")
    print(f"validation grids    : {', '.join(grids) or 'none'}")
    print(f"resume              : python -m train fit --config {TINY_CONFIG} ... --ckpt_path last")
    return 0


if __name__ == "__main__":
    sys.exit(main())
