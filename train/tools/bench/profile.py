"""Where one training step's time goes: ``python -m train.tools.bench.profile --config sd15 --precision bf16``.

Builds the benchmark's module of that shape (:mod:`train.tools.bench.models`), runs warm-up steps, then one
step under ``torch.profiler`` and prints the ops by self CPU time (``--cuda``-side time on a GPU) and each op
group's share: convolutions, attention, matmuls, casts/copies, normalisation, activations, optimizer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

GROUPS = {
    "convolution": ("convolution",),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "bmm", "softmax"),
    "matmul": ("aten::mm", "aten::addmm", "aten::linear"),
    "cast / copy": ("copy_", "_to_copy", "ToCopyBackward"),
    "normalisation": ("group_norm", "layer_norm"),
    "activation": ("silu", "gelu"),
    "optimizer": ("adam", "Optimizer."),
}


def group_shares(events) -> dict[str, float]:
    """Fraction of the self time of ``events`` (profiler key averages) in each :data:`GROUPS` entry."""
    cuda = any(getattr(e, "self_device_time_total", 0) for e in events)
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in events) or 1
    shares = dict.fromkeys([*GROUPS, "other"], 0.0)
    for e in events:
        group = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), "other")
        shares[group] += time_of(e) / total
    return shares


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from train.optim import build_optimizer
    from train.tools.bench.models import SHAPES, build_module, make_batch
    from train.tools.bench.step import set_variant, train_step

    parser = argparse.ArgumentParser(prog="python -m train.tools.bench.profile", description=__doc__)
    parser.add_argument("--config", choices=sorted(SHAPES), default="small")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(Path(tmp), args.config).to(device)
        batch = make_batch(module, args.config, device)
        set_variant(module, args.precision, args.checkpointing)
        params = [p for p in module.brushnet.parameters() if p.requires_grad]
        opt = build_optimizer(params, args.optimizer, lr=1e-5)
        for _ in range(2):
            train_step(module, batch, opt, args.precision)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            train_step(module, batch, opt, args.precision)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows))
    print(
        f"{args.config}, {args.precision}, checkpointing {args.checkpointing}, {torch.get_num_threads()} threads:"
    )
    for group, share in group_shares(events).items():
        print(f"  {group:14s} {share:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
