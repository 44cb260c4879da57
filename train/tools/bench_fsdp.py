"""FSDP2 runs and benchmarks for BrushNet: a real multi-process Lightning run on synthetic latents.

    python -m train.tools.bench_fsdp run --strategy fsdp --optimizer adamw8bit --steps 4 --ckpt-every 2 --out DIR
    python -m train.tools.bench_fsdp memory            # per-rank bytes: DDP vs FSDP2, AdamW vs AdamW8bit, SD1.5 branch
    python -m train.tools.bench_fsdp speed             # step time FSDP2 / DDP on the small config (2 CPU processes)

``run`` trains :class:`SyntheticBrushNetModule` (the real model library: a frozen diffusers UNet, a
trainable ``BrushNetModel.from_unet`` branch, ``unet_forward_with_brushnet``) on latents generated from
``(global_step, rank)``, so every strategy/optimizer and a resumed run see exactly the same data. It
writes per-rank ``losses-rank{r}.json``, the exported branch folder, and each rank's local parameter
shards (``shards-rank{r}.pt``), which the tests use to check the export independently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brushnet.injection import unet_forward_with_brushnet
from brushnet.model import BrushNetModel
from brushnet.testing.tiny import tiny_unet_config
from train.fsdp import FSDP2Strategy, export_branch, is_sharded

# The "small" config of the step-time benchmark: 3 levels, 16x16 latents (128 px images).
SMALL_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(64, 128, 128),
    norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
)
CONFIGS = {"tiny": dict(tiny_unet_config("sd15")), "small": SMALL_UNET}


def _lightning():
    import lightning.pytorch as pl

    return pl


class SyntheticBrushNetModule(_lightning().LightningModule):
    """Frozen UNet + trainable branch, epsilon-prediction MSE on seeded random latents."""

    def __init__(
        self,
        config: str = "tiny",
        optimizer: str = "adamw",
        lr: float = 1e-3,
        batch_size: int = 2,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.cfg = CONFIGS[config]
        self.optimizer_name, self.lr, self.batch_size = optimizer, lr, batch_size
        self.activation_checkpointing, self.seed = activation_checkpointing, seed
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(**self.cfg).requires_grad_(False)
        self.brushnet = BrushNetModel.from_unet(self.unet)
        # Official init makes the zero convs zero: perturb them so the branch affects the loss at step 0.
        with torch.no_grad():
            for p in self.brushnet.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        self.losses: list[tuple[int, float]] = []
        self.step_times: list[float] = []
        self.fsdp_units: dict[str, int] = {}
        # Forward calls of one resnet per model: 2 per step when activation checkpointing recomputes it.
        self.forward_calls = {"brushnet": 0, "unet": 0}
        for name in self.forward_calls:
            resnet = getattr(self, name).down_blocks[0].resnets[0]
            resnet.register_forward_pre_hook(lambda *_, n=name: self._count(n))

    def _count(self, name: str) -> None:
        self.forward_calls[name] += 1

    def configure_model(self) -> None:
        if self.activation_checkpointing:
            self.brushnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()
        # The integration snippet for the trainer's module:
        if isinstance(self.trainer.strategy, FSDP2Strategy):
            self.fsdp_units = self.trainer.strategy.shard(self) or self.fsdp_units

    def synthetic_batch(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step * 1009 + self.global_rank)
        b, size, ch = self.batch_size, self.cfg["sample_size"], self.cfg["cross_attention_dim"]
        latents = torch.randn(b, 4, size, size, generator=g)
        masked = latents * (torch.rand(b, 1, size, size, generator=g) > 0.5)
        mask = (masked != 0).float()[:, :1]
        return {
            "latents": latents,
            "cond": torch.cat([masked, mask], 1),
            "noise": torch.randn(b, 4, size, size, generator=g),
            "t": torch.randint(0, 1000, (b,), generator=g),
            "text": torch.randn(b, 7, ch, generator=g),
        }

    def training_step(self, _batch: Any, _idx: int) -> torch.Tensor:
        start = time.perf_counter()
        batch = {k: v.to(self.device) for k, v in self.synthetic_batch().items()}
        noisy = batch["latents"] * 0.7 + batch["noise"] * 0.7  # a fixed noise level stands in for DDPM
        down, mid, up = self.brushnet(noisy, batch["t"], batch["text"], batch["cond"], return_dict=False)
        pred = unet_forward_with_brushnet(self.unet, noisy, batch["t"], batch["text"], down, mid, up)
        loss = F.mse_loss(pred.float(), batch["noise"])
        self.losses.append((self.global_step, loss.item()))
        self._t0 = start
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        self.step_times.append(time.perf_counter() - self._t0)

    def configure_optimizers(self):
        params = [p for p in self.brushnet.parameters() if p.requires_grad]
        kwargs = dict(lr=self.lr, weight_decay=1e-2)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, **kwargs)
        if self.optimizer_name != "adamw8bit":
            raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer_name!r}")
        if is_sharded(params):
            from train.optim_sharded import make_sharded_adamw8bit

            return make_sharded_adamw8bit(params, **kwargs)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)

    def train_dataloader(self):
        n = 1_000_000  # the batch comes from synthetic_batch(); the loader only paces the steps
        return torch.utils.data.DataLoader(list(range(n)), batch_size=1)


def run(args: argparse.Namespace) -> None:
    pl = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(1)
    out = Path(args.out)
    # CPU: no bf16 compute (slow and imprecise there); on GPUs the defaults are bf16 params/reduce.
    dtype = None if args.dtype == "fp32" else args.dtype
    fsdp = FSDP2Strategy(param_dtype=dtype, reduce_dtype=dtype)
    strategy = fsdp if args.strategy == "fsdp" else "ddp"
    module = SyntheticBrushNetModule(
        config=args.config,
        optimizer=args.optimizer,
        lr=args.lr,
        batch_size=args.batch_size,
        activation_checkpointing=args.ac,
    )
    callbacks = []
    if args.ckpt_every:
        callbacks.append(
            ModelCheckpoint(out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=-1, save_last=False)
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        gradient_clip_val=args.clip or None,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, ckpt_path=args.resume)
    rank = trainer.global_rank
    out.mkdir(parents=True, exist_ok=True)
    if args.strategy == "fsdp":
        export_branch(module.brushnet, out / "branch", rank=rank)
        shards = {n: p.to_local().detach().clone() for n, p in module.brushnet.named_parameters()}
    else:
        if rank == 0:
            module.brushnet.save_pretrained(out / "branch")
        shards = {n: p.detach().clone() for n, p in module.brushnet.named_parameters()}
    torch.save(shards, out / f"shards-rank{rank}.pt")
    record = {
        "rank": rank,
        "global_step": trainer.global_step,
        "losses": module.losses,
        "step_times": module.step_times,
        "fsdp_units": module.fsdp_units,
        "forward_calls": module.forward_calls,
    }
    (out / f"losses-rank{rank}.json").write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------- memory
def _local_numel(shape: torch.Size, world: int, rank: int = 0) -> int:
    """Elements of ``rank``'s FSDP2 shard: dim 0 split like ``torch.chunk`` (rank 0 holds the most)."""
    if world == 1:
        return math.prod(shape)
    rows = math.ceil(shape[0] / world)
    start = min(rank * rows, shape[0])
    return (min(start + rows, shape[0]) - start) * (math.prod(shape) // shape[0])


def _adam8bit_state_bytes(numel_local: int, numel_global: int, min_8bit_size: int = 4096) -> int:
    if numel_global < min_8bit_size:
        return 8 * numel_local  # two fp32 moments (bitsandbytes keeps small tensors in 32 bit)
    blocks = math.ceil(numel_local / 256)
    return 2 * numel_local + 2 * 4 * blocks + 2 * 256 * 4  # uint8 codes + fp32 absmax + the two qmaps


def memory_table(shapes: list[torch.Size], world: int) -> dict[str, dict[str, float]]:
    """Rank-0 bytes of fp32 params + fp32 grads + optimizer state, sharded ``world`` ways (1 = DDP)."""
    params = sum(_local_numel(s, world) for s in shapes)
    adamw = 8 * params
    adam8 = sum(_adam8bit_state_bytes(_local_numel(s, world), math.prod(s)) for s in shapes)
    gib = 1024**3
    return {
        "adamw": {"params": 4 * params / gib, "grads": 4 * params / gib, "optim": adamw / gib},
        "adamw8bit": {"params": 4 * params / gib, "grads": 4 * params / gib, "optim": adam8 / gib},
    }


def sd15_on_meta() -> tuple[nn.Module, BrushNetModel]:
    """The SD1.5 UNet and its BrushNet branch, shapes only (meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD1.5 UNet config
        return unet, BrushNetModel.from_unet(unet, load_weights_from_unet=False)


def sd15_branch_on_meta() -> BrushNetModel:
    return sd15_on_meta()[1]


def measured_sharded_bytes(world: int) -> dict[str, int]:
    """Build the SD1.5 branch on meta, ``fully_shard`` it over a real ``world``-rank gloo group, create the
    optimizer states for the actual local shards, and sum their bytes (rank 0). Run under torchrun."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from train.fsdp import shard_model
    from train.optim_sharded import ShardedAdamW8bit

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    branch = sd15_branch_on_meta()
    shard_model(branch, mesh, MixedPrecisionPolicy())
    params = list(branch.parameters())
    opt = ShardedAdamW8bit(params)
    state_bytes = 0
    for p in params:
        st: dict[str, Any] = {}
        opt._init_state(p, st)
        state_bytes += sum(
            (t.to_local() if hasattr(t, "to_local") else t).nbytes for t in st.values() if t.ndim > 0
        )
    local = sum(p.to_local().nbytes for p in params)
    result = {"params": local, "adamw": 2 * local, "adamw8bit": state_bytes}
    dist.destroy_process_group()
    return result


def _largest_unit(model: nn.Module) -> int:
    """Elements of the largest FSDP unit of :func:`train.fsdp.shard_model` (what one all-gather holds)."""
    from train.fsdp import _BLOCK_CLASS_NAMES

    blocks = [m for m in model.modules() if type(m).__name__ in _BLOCK_CLASS_NAMES]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    return max([root] + [sum(p.numel() for p in b.parameters()) for b in blocks])


def memory(args: argparse.Namespace) -> None:
    if args.measure:
        res = measured_sharded_bytes(int(os.environ["WORLD_SIZE"]))
        if int(os.environ["RANK"]) == 0:
            print(json.dumps({"measured_rank0_bytes": res}))
        return
    unet, branch = sd15_on_meta()
    shapes = [p.shape for p in branch.parameters()]
    unet_shapes = [p.shape for p in unet.parameters()]
    gib = 1024**3
    print(f"SD1.5-shaped branch: {sum(math.prod(s) for s in shapes) / 1e6:.1f}M parameters (fp32 master)")
    print(f"SD1.5 UNet (frozen, bf16): {sum(math.prod(s) for s in unet_shapes) / 1e6:.1f}M parameters")
    print(
        f"largest FSDP unit, gathered in bf16: branch {2 * _largest_unit(branch) / gib:.3f} GiB, "
        f"UNet {2 * _largest_unit(unet) / gib:.3f} GiB (transient, x2 with prefetch)"
    )
    print(
        "| strategy | optimizer | branch params | grads | optimizer state | branch total | + frozen UNet bf16 |"
    )
    print("|---|---|---|---|---|---|---|")
    for world, name in [(1, "DDP"), (2, "FSDP2 x2"), (4, "FSDP2 x4"), (8, "FSDP2 x8")]:
        unet_gib = 2 * sum(_local_numel(s, world) for s in unet_shapes) / gib
        for opt, row in memory_table(shapes, world).items():
            total = sum(row.values())
            print(
                f"| {name} | {opt} | {row['params']:.3f} | {row['grads']:.3f} | {row['optim']:.3f} "
                f"| {total:.3f} | {total + unet_gib:.3f} |"
            )


# ----------------------------------------------------------------------------------------------- speed
def speed(args: argparse.Namespace) -> None:
    import subprocess
    import sys

    times, losses = {}, {}
    for strategy in ("ddp", "fsdp"):
        out = Path(args.out) / strategy
        cmd = [
            sys.executable,
            "-m",
            "train.tools.bench_fsdp",
            "run",
            "--strategy",
            strategy,
            "--config",
            args.config,
        ]
        cmd += ["--steps", str(args.steps), "--out", str(out), "--optimizer", args.optimizer]
        subprocess.run(cmd, check=True)
        rec = json.loads((out / "losses-rank0.json").read_text())
        steady = rec["step_times"][2:]  # skip warm-up steps
        times[strategy] = sum(steady) / len(steady)
        losses[strategy] = [round(x, 5) for _, x in rec["losses"]]
    result = {"sec_per_step": times, "fsdp_over_ddp": times["fsdp"] / times["ddp"], "rank0_losses": losses}
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--strategy", choices=["fsdp", "ddp"], default="fsdp")
    r.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    r.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--ckpt-every", type=int, default=0)
    r.add_argument("--resume", default=None)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--devices", type=int, default=2)
    r.add_argument("--ac", action="store_true", help="activation checkpointing")
    r.add_argument("--clip", type=float, default=1.0, help="gradient clipping by global norm (0: off)")
    r.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="FSDP2 param/reduce dtype")
    r.add_argument("--out", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--measure", action="store_true", help="under torchrun: measure real shards")
    s = sub.add_parser("speed")
    s.add_argument("--config", choices=sorted(CONFIGS), default="small")
    s.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--out", default="bench_fsdp_out")
    args = parser.parse_args(argv)
    {"run": run, "memory": memory, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
