"""Peak RSS of ``brushnet-train fit`` itself: one trainer process per memory switch, as a user runs it.

    python -m train.tools.bench.trainer_memory [--config sd15] [--steps 3] [--out trainer_memory.json]

The step benchmark counts live tensors inside one process; this is what the operating system sees (and what an
out-of-memory kill acts on): the base loaded from a diffusers folder with its frozen weights in the training
dtype, the DataModule, Lightning, the allocator's slack. The base is the shape's random model saved as a
diffusers folder, the data a BrushData shard of photo crops at the shape's size; the number is the trainer's
own ``train/peak_mem_gb`` (the process's max RSS on CPU, the allocator peak on CUDA) after the last step, and
the time is that of the last step (``train/device/samples_per_sec``, batch 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# name -> (precision, optimizer, gradient checkpointing); the switches the README's memory notes name
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "fp32, AdamW": ("32-true", "adamw", False),
    "bf16, AdamW": ("bf16-mixed", "adamw", False),
    "bf16, AdamW8bit": ("bf16-mixed", "adamw8bit", False),
    "bf16, checkpointing, AdamW8bit": ("bf16-mixed", "adamw8bit", True),
}


def shaped_base(root: Path, name: str) -> Path:
    """The benchmark shape ``name`` as a diffusers base folder (random weights, fp32 on disk)."""
    from brushnet.testing.tiny import build_tiny_base
    from train.tools.bench.models import FULL_ONLY, SHAPES, full_size_parts

    base = build_tiny_base(root / f"base_{name}", SHAPES[name].kind)
    if name in FULL_ONLY:
        for attr, part in full_size_parts(name).items():
            part.save_pretrained(base / attr)
    return base


def run_config(base: Path, shards: Path, size: int, run: Path, variant: str, steps: int) -> dict:
    precision, optimizer, checkpointing = VARIANTS[variant]
    return {
        "seed_everything": 0,
        "model": {
            "pretrained_model_name_or_path": str(base),
            "optimizer": optimizer,
            "learning_rate": 1e-5,
            "gradient_checkpointing": checkpointing,
        },
        "data": {"train_shards": str(shards), "resolution": size, "batch_size": 1, "num_workers": 0},
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "precision": precision,
            "max_steps": steps,
            "log_every_n_steps": 1,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "logs"},
            },
            "callbacks": [{"class_path": "train.monitor.TrainingMonitor"}],
        },
    }


def measure(base: Path, shards: Path, size: int, work: Path, variant: str, steps: int) -> dict:
    """One ``python -m train fit`` process: its peak memory and the time of its last step."""
    run = work / variant.replace(", ", "_").replace(" ", "-")
    run.mkdir(parents=True)
    config = run / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(base, shards, size, run, variant, steps)))
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    cmd = [sys.executable, "-m", "train", "fit", "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {done.returncode}: {tail[0]}"}
    (metrics,) = run.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    memory = [float(r["train/peak_mem_gb"]) for r in rows if r.get("train/peak_mem_gb")]
    rates = [float(r["train/device/samples_per_sec"]) for r in rows if r.get("train/device/samples_per_sec")]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    return {
        "peak_gib": max(memory),
        "last_step_s": 1.0 / rates[-1],
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def trainer_memory(name: str, steps: int = 3, variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    """Every variant on the shape ``name`` (``tiny`` for tests, ``sd15`` for the README's numbers)."""
    from train.tools.bench.models import SHAPES
    from train.tools.demo_data import write_demo_shards

    size = SHAPES[name].size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = shaped_base(work, name)
        shards = write_demo_shards(work / "shards", size=size, crops_per_photo=1)
        rows = {v: measure(base, shards, size, work, v, steps) for v in variants}
    return {"config": name, "size": size, "batch": 1, "variants": rows}


def markdown(result: dict) -> str:
    rows = result["variants"]
    ref = rows.get("fp32, AdamW", {}).get("peak_gib")
    lines = [
        f"**Trainer process, {result['config']}** ({result['size']} px, batch 1: `brushnet-train fit`, "
        "peak RSS on CPU / allocator peak on CUDA)",
        "",
        "| switches | peak GiB | vs fp32 AdamW | last step s |",
        "|---|---|---|---|",
    ]
    for variant, r in rows.items():
        if "error" in r:
            lines.append(f"| {variant} | failed: {r['error']} | | |")
            continue
        saving = f"{r['peak_gib'] / ref - 1:+.0%}" if ref else "-"
        lines.append(f"| {variant} | {r['peak_gib']:.2f} | {saving} | {r['last_step_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from train.tools.bench.models import SHAPES

    parser = argparse.ArgumentParser(prog="python -m train.tools.bench.trainer_memory", description=__doc__)
    parser.add_argument("--config", choices=sorted(SHAPES), default="sd15")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = trainer_memory(args.config, args.steps, tuple(args.variants))
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)
    print(markdown(result))
    return 0 if all("error" not in r for r in result["variants"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
