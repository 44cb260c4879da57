"""``make bench``: the device's limits, the training step, framework overhead, the loader and the data
pipeline; writes ``bench.json`` and prints markdown tables. Every figure is a median of several runs after
warm-up; figures that are compared are measured interleaved in the same run.

    python -m train.tools.bench [--quick] [--full] [--out bench.json]

``--quick`` (``make bench QUICK=1``): tiny + small step, fewer repeats and samples (a few minutes on 2 CPU
cores). ``--full`` adds the SD1.5 shape (512 px, bs 1; 10-16 GiB of memory on CPU) and, with
``--configs sdxl``, the SDXL shape (1024 px; > 40 GiB); for those shapes the ``trainer`` part also runs
``brushnet-train fit`` once per memory switch and reports each process's peak memory
(:mod:`train.tools.bench.trainer_memory`; ``--smoke`` runs one such process on the tiny shape).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from train.tools.bench.common import machine
from train.tools.bench.report import markdown

PARTS = ("steps", "overhead", "trainer", "loader", "pipeline")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats/samples, tiny + small only")
    parser.add_argument("--smoke", action="store_true", help="the least that runs every part (for tests)")
    parser.add_argument("--full", action="store_true", help="add the SD1.5 shape (10-16 GiB on CPU)")
    parser.add_argument("--configs", nargs="+", help="step shapes (default: tiny small [+ sd15 with --full])")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts not to run")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.configs is None:
        default = ["tiny", "small"] + (["sd15"] if args.full and not args.quick else [])
        args.configs = ["tiny"] if args.smoke else default
    return args


@dataclass(frozen=True)
class Settings:
    """Repeats and sizes of one mode (each figure: the median of ``*_repeats`` interleaved rounds)."""

    step_repeats: int
    optimizer_repeats: int
    lightning_steps: int
    lightning_rounds: int
    loader_samples: int
    loader_repeats: int
    loader_sources: tuple[str, ...]
    loader_workers: tuple[int, ...]
    limit_repeats: int


SETTINGS = {
    "smoke": Settings(1, 1, 2, 1, 8, 1, ("640x480",), (0, 1), 1),
    "quick": Settings(3, 3, 6, 2, 32, 3, ("640x480", "1365x1024"), (0, 1, 2), 3),
    "default": Settings(4, 5, 10, 3, 64, 5, ("640x480", "1365x1024"), (0, 1, 2), 5),
}


def run_steps(configs: list[str], cfg: Settings, peak: dict[str, float], device: torch.device, skip) -> dict:
    from train.tools.bench.models import FULL_ONLY, SHAPES, build_module, make_batch
    from train.tools.bench.overhead import lightning_overhead
    from train.tools.bench.step import bench_optimizer_step, bench_steps

    out = {}
    optimizers = ("adamw", "adamw8bit") if _has_bnb() else ("adamw",)
    with tempfile.TemporaryDirectory() as tmp:
        for name in configs:
            big = name in FULL_ONLY
            module = build_module(Path(tmp), name).to(device)
            batch = make_batch(module, name, device)
            shape = SHAPES[name]
            entry: dict = {"size": shape.size, "batch": shape.batch, "memory": shape.memory}
            entry["branch_params"] = sum(p.numel() for p in module.brushnet.parameters())
            if "steps" not in skip:
                entry["steps"] = bench_steps(
                    module, batch, optimizers, min(cfg.step_repeats, 2 if big else 99), peak
                )
                entry["optimizer_step"] = bench_optimizer_step(module, cfg.optimizer_repeats)
            if "overhead" not in skip and not big:
                entry["lightning"] = lightning_overhead(
                    module, batch, cfg.lightning_steps, cfg.lightning_rounds
                )
            out[name] = entry
            print(f"steps {name}: done", file=sys.stderr, flush=True)
            del module, batch
    return out


def _has_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def run_pipeline(quick: bool) -> dict:
    """``python -m data_pipeline bench`` in a subprocess (``train`` never imports ``data_pipeline``)."""
    with tempfile.TemporaryDirectory() as tmp:
        images, urls = ("4", "16") if quick else ("8", "100")
        cmd = [
            sys.executable,
            "-m",
            "data_pipeline",
            "bench",
            "--out",
            tmp,
            "--images",
            images,
            "--urls",
            urls,
        ]
        env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
        return json.loads((Path(tmp) / "bench.json").read_text())


def run(args: argparse.Namespace) -> dict:
    from train.tools.bench.limits import limits

    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "smoke" if args.smoke else "quick" if args.quick else "default"
    cfg = SETTINGS[mode]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    result: dict = {"machine": machine(), "mode": mode + (" + full" if "sd15" in args.configs else "")}
    result["limits"] = limits(device, mode != "default", cfg.limit_repeats)
    mm = result["limits"]["matmul"]
    peak = {"fp32": mm["float32"]["flops"], "bf16": mm["bfloat16"]["flops"]}
    if "steps" not in args.skip or "overhead" not in args.skip:
        result["steps"] = run_steps(args.configs, cfg, peak, device, args.skip)
    if "trainer" not in args.skip:
        from train.tools.bench.models import FULL_ONLY
        from train.tools.bench.trainer_memory import trainer_memory

        shapes = [c for c in args.configs if c in FULL_ONLY]
        result["trainer_memory"] = [trainer_memory(c) for c in shapes]
        if mode == "smoke":
            result["trainer_memory"].append(trainer_memory("tiny", variants=("bf16, AdamW8bit",)))
    if "loader" not in args.skip:
        from train.tools.bench.data import bench_loader

        result["loader"] = bench_loader(
            samples=cfg.loader_samples,
            repeats=cfg.loader_repeats,
            sources=cfg.loader_sources,
            workers=cfg.loader_workers,
        )
    if "pipeline" not in args.skip:
        result["pipeline"] = run_pipeline(mode != "default")
    result["not_run"] = [c for c in ("sd15", "sdxl") if c not in args.configs]
    result["wall_s"] = time.perf_counter() - start
    return result


def _quiet() -> None:
    import logging

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32" per cast
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    result = run(args)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(markdown(result))
    return 0
