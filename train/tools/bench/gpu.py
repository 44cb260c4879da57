"""The CUDA checks as one prepared command, for a session that is lent a GPU:

    python -m train.tools.bench.gpu [--configs sd15 sdxl] [--batch N] [--steps 5] [--compile] [--out gpu.json]

1. the limits: dense fp32 / bf16 ``torch.mm`` and copy bandwidth;
2. per shape (SD1.5 at 512 px, SDXL at 1024 px; random init) and batch: seconds per step, samples/s, peak
   allocator memory and MFU (FlopCounterMode's forward + backward FLOPs / time, against the bf16 ``mm`` rate
   measured here and against the datasheet's dense bf16 peak of a known GPU) for bf16 autocast with fused
   AdamW, with AdamW8bit (bitsandbytes' CUDA kernels), and with ``--compile`` the UNet and branch compiled;
3. the user's path on the device: ``brushnet-train fit`` on the shipped tiny photo base, bf16-mixed +
   AdamW8bit (exit status, first and last loss, peak memory, step time).

Writes JSON and prints markdown. On a machine without CUDA it runs on the CPU (``--configs tiny`` for the
test). NCCL needs two GPUs: run the DDP tests there (``tests/train/test_resume.py -k ddp`` with
``--trainer.accelerator=gpu``); one lent GPU cannot check it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, first match on the device name.
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def datasheet_peak(name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16 if key in name), None)


def step_rows(name: str, batch_size: int, steps: int, compile_: bool, device: torch.device) -> list[dict]:
    """s/step, samples/s, MFU and peak memory of the bf16 step of shape ``name`` per optimizer variant."""
    from train.optim import build_optimizer
    from train.tools.bench.common import median
    from train.tools.bench.models import build_module, make_batch
    from train.tools.bench.step import set_variant, step_flops, train_step

    variants = [("adamw", False), ("adamw8bit", False)] + ([("adamw", True)] if compile_ else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(Path(tmp), name).to(device)
        batch = make_batch(module, name, device, batch_size)
        # FLOPs are linear in the batch; counted at batch 1 (an fp32 pass of SDXL at batch 8 would not fit)
        flops = step_flops(module, make_batch(module, name, device, 1)) * batch_size
        set_variant(module, "bf16", False)
        params = [p for p in module.brushnet.parameters() if p.requires_grad]
        for optimizer, compiled in variants:  # compiled last: compiling is in place and stays
            if compiled:
                module.unet.compile()
                module.brushnet.compile()
            opt = build_optimizer(params, optimizer, lr=1e-5)
            start = time.perf_counter()
            for _ in range(2):  # warm-up: optimizer state, kernels (and compilation)
                train_step(module, batch, opt, "bf16")
            warmup = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                train_step(module, batch, opt, "bf16")  # synchronises the device at its end
                times.append(time.perf_counter() - start)
            s = median(times)
            row = {
                "config": name,
                "batch": batch_size,
                "optimizer": optimizer,
                "compiled": compiled,
                "s_per_step": s,
                "samples_per_s": batch_size / s,
                "tflops": flops / s / 1e12,
                "warmup_s": warmup,
            }
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(row)
            del opt
            for p in params:
                p.grad = None
    return rows


def trainer_check(steps: int) -> dict:
    """``brushnet-train fit`` on the shipped tiny photo base, bf16-mixed + AdamW8bit, on this device."""
    from brushnet.testing.tiny_base import pretrained_tiny_base
    from train.tools.bench.trainer_memory import measure
    from train.tools.demo_data import write_demo_shards

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = write_demo_shards(work / "shards", size=128, crops_per_photo=4)
        return measure(pretrained_tiny_base(), shards, 64, work, "bf16, AdamW8bit", steps)


DEFAULT_BATCH = {"sd15": 8, "sdxl": 2}  # per GPU; --batch sets all


def run(configs: list[str], batch: int | None, steps: int, compile_: bool, trainer_steps: int) -> dict:
    from train.tools.bench.common import machine
    from train.tools.bench.limits import limits

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {"machine": machine(), "device_name": name, "limits": limits(device, True, 5)}
    measured = result["limits"]["matmul"]["bfloat16"]["flops"]
    nominal = datasheet_peak(name)
    result["steps"] = []
    result["errors"] = {}
    for config in configs:
        size = batch or DEFAULT_BATCH.get(config, 2)
        try:
            rows = step_rows(config, size, steps, compile_, device)
        except torch.OutOfMemoryError as e:  # keep the other shapes' numbers
            result["errors"][config] = f"out of memory at batch {size}: {str(e).splitlines()[0]}"
            continue
        for row in rows:
            row["mfu_of_measured_mm"] = row["tflops"] * 1e12 / measured
            if nominal:
                row["mfu_of_datasheet"] = row["tflops"] * 1e12 / nominal
            result["steps"].append(row)
    result["trainer"] = trainer_check(trainer_steps)
    return result


def markdown(result: dict) -> str:
    mm = result["limits"]["matmul"]
    lines = [
        f"Device: {result['device_name']}; torch.mm bf16 {mm['bfloat16']['flops'] / 1e12:.0f} TFLOP/s, fp32 "
        f"{mm['float32']['flops'] / 1e12:.0f} TFLOP/s",
        "",
        "| shape | batch | optimizer | compiled | s/step | samples/s | TFLOP/s | MFU (measured mm) | MFU (datasheet) "
        "| peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
        datasheet = f"{r['mfu_of_datasheet']:.0%}" if "mfu_of_datasheet" in r else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['optimizer']} | {r['compiled']} | {r['s_per_step']:.3f} | "
            f"{r['samples_per_s']:.1f} | {r['tflops']:.1f} | {r['mfu_of_measured_mm']:.0%} | {datasheet} | {peak} |"
        )
    lines += [f"{config}: {error}" for config, error in result.get("errors", {}).items()]
    t = result["trainer"]
    if "error" in t:
        lines += ["", f"brushnet-train fit on the device: failed: {t['error']}"]
    else:
        lines += [
            "",
            f"brushnet-train fit on the device (tiny photo base, bf16-mixed, AdamW8bit, {t['steps']} steps): loss "
            f"{t['first_loss']:.4f} -> {t['last_loss']:.4f}, peak {t['peak_gib']:.2f} GiB, last step "
            f"{t['last_step_s'] * 1e3:.0f} ms",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tools.bench.gpu", description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--batch", type=int, default=None, help=f"per-shape default {DEFAULT_BATCH}, else 2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled UNet + branch")
    parser.add_argument("--trainer-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("gpu.json"))
    args = parser.parse_args(argv)
    result = run(args.configs, args.batch, args.steps, args.compile, args.trainer_steps)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(markdown(result))
    return 0 if "error" not in result["trainer"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
