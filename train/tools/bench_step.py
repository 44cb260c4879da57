"""Step-time / peak-memory benchmark of the training step (a script, not a test).

    python -m train.tools.bench_step [--configs tiny small] [--steps 10] [--out bench.json]

For each model size (``tiny``: the test base, 32 px; ``small``: a 3-level UNet, 128 px), fp32 vs bf16
autocast, AdamW vs AdamW8bit, gradient checkpointing off/on: median seconds per optimizer step of a bare
PyTorch loop over :meth:`BrushNetTrainingModule.compute_loss`, and of ``Trainer.fit`` on the same module
and batch (Lightning overhead ratio, goal <= 1.10). CPU peak memory is the process max RSS (monotonic, so
read it per configuration in a fresh process for absolute numbers); on CUDA it is the allocator peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch

from brushnet.testing.tiny import build_tiny_base
from train.module import BrushNetTrainingModule
from train.monitor import peak_memory_gb
from train.optim import build_optimizer

SMALL_UNET = dict(
    block_out_channels=(64, 128, 128),
    norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
)
SIZES = {"tiny": 32, "small": 128}


def make_base(root: Path, config: str) -> Path:
    base = build_tiny_base(root / config)
    if config == "small":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        cfg = dict(unet.config)
        cfg.update(SMALL_UNET)
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(cfg).save_pretrained(base / "unet")
    return base


def make_batch(module: BrushNetTrainingModule, size: int, bsz: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(bsz, 3, size, size, generator=g) * 2 - 1
    masks = (torch.rand(bsz, 1, size, size, generator=g) > 0.5).float()
    ids = module.tokenizer(
        ["a photo"] * bsz, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    return {
        "pixel_values": pixels,
        "conditioning_pixel_values": torch.where(masks > 0, pixels, torch.tensor(-1.0)),
        "masks": masks,
        "input_ids": ids,
        "original_size": torch.tensor([[size, size]] * bsz),
        "crop_top_left": torch.zeros(bsz, 2, dtype=torch.long),
        "keys": ["b"] * bsz,
        "num_bad": torch.tensor(0),
    }


def bare_loop(module, batch, steps: int, optimizer: str, bf16: bool) -> list[float]:
    opt = build_optimizer(module.brushnet.parameters(), optimizer, lr=1e-5)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        with ctx:
            loss = module.compute_loss(batch, module.step_generator(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times[2:]


class _Timer(L.Callback):
    """Seconds from one batch start to the next: the whole loop iteration, Lightning's own work included
    (fetching, hooks, logging, the LR scheduler), as the bare loop's timing includes all of its work."""

    def __init__(self):
        self.times: list[float] = []
        self._t: float | None = None

    def on_train_batch_start(self, *args):
        now = time.perf_counter()
        if self._t is not None:
            self.times.append(now - self._t)
        self._t = now


def lightning_loop(module, batch, steps: int, bf16: bool) -> list[float]:
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps + 3,  # intervals between batch starts: 2 warm-up + steps
        precision="bf16-mixed" if bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    from torch.utils.data import DataLoader

    loader = DataLoader([batch] * (steps + 3), batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, loader)
    return timer.times[2:]


def run(configs: list[str], steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            base = make_base(Path(tmp), config)
            for bf16 in (False, True):
                for optimizer in ("adamw", "adamw8bit"):
                    for ckpt in (False, True):
                        module = BrushNetTrainingModule(
                            str(base), optimizer=optimizer, gradient_checkpointing=ckpt
                        )
                        if bf16:
                            for m in module.frozen_models():
                                m.to(torch.bfloat16)
                            module.weight_dtype = torch.bfloat16
                        if ckpt:
                            module.unet.enable_gradient_checkpointing()
                            module.brushnet.enable_gradient_checkpointing()
                        module.train()
                        batch = make_batch(module, SIZES[config])
                        bare = statistics.median(bare_loop(module, batch, steps, optimizer, bf16))
                        row = dict(
                            config=config,
                            precision="bf16" if bf16 else "fp32",
                            optimizer=optimizer,
                            checkpointing=ckpt,
                            s_per_step=round(bare, 4),
                            peak_mem_gb=round(peak_memory_gb(torch.device("cpu")), 3),
                        )
                        if optimizer == "adamw" and not ckpt:
                            light = statistics.median(lightning_loop(module, batch, steps, bf16))
                            row["lightning_s_per_step"] = round(light, 4)
                            row["lightning_over_bare"] = round(light / bare, 3)
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.configs, args.steps)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
