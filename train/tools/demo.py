"""``make demo``: the whole training path offline on CPU in a few minutes, and a measured result.

1. the base: the shipped tiny base trained on photographs (``brushnet.testing.tiny_base``; SD 1.5 layout, or SDXL's
   with ``--tiny sdxl``), or ``--base`` (``make demo BASE=<hub id or folder>``), resolved before anything is written;
2. a small BrushData set of 256 random crops (several scales, flips) of the ``skimage.data`` training
   photographs with classical masks (:mod:`train.tools.demo_data`; ``make data`` shows the data pipeline
   itself);
3. ``brushnet-train fit --config configs/tiny_cpu.yaml --config <run>/demo.yaml --ckpt_path auto`` in a new run
   folder ``<out>/runs/NNN`` (or the newest unfinished one, which it resumes): checkpoints, exports, grids;
4. on crops of held-out photos (in neither the base's nor the branch's training set), the PSNR / MSE inside the
   hole of base + trained branch against the base alone (zero branch) and the untrained branch (and the same
   on new crops of the training photos), next to two fills without a model (mean colour, biharmonic), saved as
   ``<run>/results.json``; then a summary with a resume command and a quick ``brushnet inpaint`` command.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from train.tools.demo_data import build_data
from train.tools.demo_scores import evaluate_run, reference_line

log = logging.getLogger("train.tools.demo")

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
BIN = Path(sys.executable).parent


def resolve_base(base: str | None, tiny: str = "sd15") -> str:
    """A local folder for the base (without ``base``: the shipped tiny base of layout ``tiny``); a bad
    ``--base`` fails here, before any run folder is touched."""
    if not base:
        from brushnet.testing.tiny_base import pretrained_tiny_base

        return str(pretrained_tiny_base(tiny))
    from brushnet.loading import resolve_pretrained

    return str(resolve_pretrained(base))


def _has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints" / "last.ckpt").is_file() or any(run.glob("hpc_ckpt_*.ckpt"))


def choose_run(out: Path, run: Path | None = None, new: bool = False) -> Path:
    """``run`` if given; else the newest ``<out>/runs/NNN`` without ``results.json`` (it is resumed or
    restarted), unless ``new``; else the next ``NNN``. Nothing is ever deleted."""
    if run is not None:
        return run.resolve()
    runs = sorted(p for p in (out / "runs").glob("[0-9][0-9][0-9]") if p.is_dir())
    if runs and not new and not (runs[-1] / "results.json").is_file():
        return runs[-1]
    return out / "runs" / f"{int(runs[-1].name) + 1 if runs else 1:03d}"


def write_overlay(run: Path, base: str, data_args: list[str], resolution: int, steps: int | None) -> Path:
    """``<run>/demo.yaml``: the base, data, run folder, steps and validation samples of this run, on top of
    ``tiny_cpu.yaml`` (a later ``--config`` replaces the values it names; ``trainer.callbacks`` as a whole)."""
    from brushnet.atomic import atomic_write_text

    config = yaml.safe_load(TINY_CONFIG.read_text())
    callbacks = config["trainer"]["callbacks"]
    heldout = run / "inputs"
    for cb in callbacks:
        if cb["class_path"].endswith("ValidationGrids"):
            cb["init_args"]["resolution"] = resolution
            cb["init_args"]["samples"] = [
                {
                    "image": str(heldout / "image.png"),
                    "mask": str(heldout / "mask.png"),
                    "prompt": _caption(run),
                },
                {"image": "skimage:astronaut", "mask": "box:0.3,0.2,0.7,0.6", "prompt": "an astronaut"},
            ]
    data = {"resolution": resolution, "train_shards": data_args[1]}
    trainer = {"default_root_dir": str(run), "callbacks": callbacks}
    if steps:
        trainer["max_steps"] = steps
    overlay = {"model": {"pretrained_model_name_or_path": base}, "data": data, "trainer": trainer}
    path = run / "demo.yaml"
    atomic_write_text(path, "# written by train/tools/demo.py\n" + yaml.safe_dump(overlay, sort_keys=False))
    return path


def _caption(run: Path) -> str:
    return (run / "inputs" / "prompt.txt").read_text().strip()


def write_inputs(run: Path, resolution: int) -> None:
    """A held-out crop, a box mask and its caption under ``<run>/inputs`` (validation grid and inpaint example)."""
    import PIL.Image

    from brushnet.atomic import atomic_write_text, save_image_atomic
    from brushnet.testing.heldout import held_out_cases

    case = held_out_cases(n=1, size=resolution, seed=1)[0]
    (run / "inputs").mkdir(parents=True, exist_ok=True)
    save_image_atomic(PIL.Image.fromarray(case.image), run / "inputs" / "image.png")
    save_image_atomic(PIL.Image.fromarray((case.hole * 255).astype(np.uint8)), run / "inputs" / "mask.png")
    atomic_write_text(run / "inputs" / "prompt.txt", case.caption + "\n")


def train_command(run: Path, threads: int | None, extra: list[str]) -> list[str]:
    env = [f"OMP_NUM_THREADS={threads}"] if threads else []
    return [
        *env,
        str(BIN / "brushnet-train"),
        "fit",
        "--config",
        str(TINY_CONFIG),
        "--config",
        str(run / "demo.yaml"),
        "--ckpt_path",
        "auto",
        *extra,
    ]


def run_training(cmd: list[str]) -> int:
    env = dict(os.environ)
    while cmd and "=" in cmd[0] and not cmd[0].startswith("/"):
        name, value = cmd[0].split("=", 1)
        env[name] = value
        cmd = cmd[1:]
    return subprocess.run(cmd, env=env, check=False).returncode


def newest_export(run: Path) -> Path | None:
    exports = sorted((run / "export").glob("step-*/brushnet"))
    return exports[-1].parent if exports else None


def _print_summary(
    run: Path, base: str, export: Path | None, results: dict | None, cmd: list[str], took: float
):
    grids = sorted(run.glob("logs/*/validation/step-*"))
    print(f"\n=== BrushNet demo finished in {took:.0f} s ===")
    print(f"base model       : {base}")
    print(f"run folder       : {run}")
    print(f"exported branch  : {export} (brushnet/, brushnet_ema/)")
    print(
        f"validation grids : {grids[-1] if grids else 'none'} (masked input | mask | output | blended | truth)"
    )
    if (run / "comparison.png").is_file():
        print(f"comparison       : {run / 'comparison.png'} (masked input | base alone | trained | truth)")
    if results:
        print(
            f"held-out inpainting, {results['cases']} crops of {', '.join(results['held_out_photos'])} "
            f"(not in any training set), {results['inference_steps']} steps; inside the hole (outside it, "
            "before blending):"
        )
        for name, s in results["scores"].items():
            print(
                f"  {name:22s}: PSNR {s['psnr_db']:6.2f} dB   MSE {s['mse']:.4f}   "
                f"(kept region PSNR {s['kept_psnr_db']:6.2f} dB)"
            )
        print(
            f"  trained - base alone  : {results['psnr_gain_db_vs_base_alone']:+.2f} dB;  trained - untrained: "
            f"{results['psnr_gain_db_vs_untrained']:+.2f} dB  ({run / 'results.json'})"
        )
        seen = results["training_photos_scores"]
        print(
            f"new crops and holes of the training photos (the base knows them): hole PSNR base alone "
            f"{seen['base alone']['psnr_db']:.2f} dB, trained branch {seen['trained branch']['psnr_db']:.2f} dB "
            f"({results['training_photos_psnr_gain_db_vs_base_alone']:+.2f} dB)"
        )
        print(reference_line(results))
    steps = int(export.name.split("-")[1]) if export else 0
    print(f"train 100 more steps:\n  {shlex.join([*cmd, f'--trainer.max_steps={steps + 100}'])}")
    if export:
        inpaint = [
            str(BIN / "brushnet"),
            "inpaint",
            "--base",
            base,
            "--brushnet",
            str(export / "brushnet_ema"),
            "--image",
            str(run / "inputs" / "image.png"),
            "--mask",
            str(run / "inputs" / "mask.png"),
            "--prompt",
            _caption(run),
            "--steps",
            "20",
            "--guidance",
            "1.0",
            "--seed",
            "0",
            "--threads",
            "1",
            "--out",
            str(run / "inpaint.png"),
        ]
        print(f"inpaint a held-out crop (seconds):\n  {shlex.join(inpaint)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where everything goes (default: demo/, demo/sdxl/ for --tiny sdxl)",
    )
    parser.add_argument(
        "--base", default=os.environ.get("BASE") or None, help="hub id or folder of a real base"
    )
    parser.add_argument(
        "--tiny",
        choices=("sd15", "sdxl"),
        default="sd15",
        help="without --base: the shipped tiny base of this layout (make demo FAMILY=sdxl)",
    )
    parser.add_argument(
        "--run", type=Path, default=None, help="run folder to resume or start (default: see above)"
    )
    parser.add_argument(
        "--new", action="store_true", help="start a new run folder even if the newest is unfinished"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: tiny_cpu.yaml's 1000)"
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
    parser.add_argument(
        "--eval-cases", type=int, default=None, help="held-out crops to score (default 16; 0 with --base)"
    )
    parser.add_argument("--eval-steps", type=int, default=10, help="sampling steps per held-out crop")
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=1,
        help="samples per crop; >1 also scores their average, comparable with deterministic fills",
    )
    parser.add_argument("extra", nargs="*", help="more LightningCLI arguments, e.g. --trainer.max_steps=50")
    args = parser.parse_args(argv)
    if args.eval_samples < 1:
        parser.error(f"--eval-samples must be at least 1, got {args.eval_samples}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    # The tiny model's ops are far too small to gain from intra-op parallelism: with torch's default (one
    # thread per core) on a 2-core machine that is also busy, every op waits at OpenMP barriers for a
    # descheduled thread, measured at 2-8 s per step instead of 0.12 s with one thread.
    threads = args.threads or (None if args.base else 1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from brushnet.loading import BaseModelError

    try:
        base = resolve_base(args.base, args.tiny)
    except (BaseModelError, FileNotFoundError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    out = (args.out or Path("demo" if args.base or args.tiny == "sd15" else "demo/sdxl")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = choose_run(out, args.run, args.new)
    resolution = args.resolution or (512 if args.base else 64)
    data_args = build_data(out, size=max(128, resolution))
    resuming = _has_checkpoint(run)
    log.info("%s run folder %s", "resuming" if resuming else "starting", run)
    if not (run / "inputs" / "prompt.txt").is_file():
        write_inputs(run, resolution)
    write_overlay(run, base, data_args, resolution, args.steps)
    extra = [*(["--trainer.accelerator=auto"] if args.base else []), *args.extra]
    cmd = train_command(run, threads, extra)
    code = run_training(cmd)
    if code != 0:
        print(
            f"demo: error: training exited with status {code}; the run folder {run} is kept", file=sys.stderr
        )
        return code
    export = newest_export(run)
    cases = args.eval_cases if args.eval_cases is not None else (0 if args.base else 16)
    results = None
    if export and cases > 0:
        results = evaluate_run(run, base, export, cases, args.eval_steps, resolution, args.eval_samples)
    _print_summary(run, base, export, results, cmd, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
