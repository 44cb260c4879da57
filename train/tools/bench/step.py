"""The training step: time, FLOPs, achieved FLOP/s, peak tensor memory per precision / checkpointing /
optimizer; the optimizer step alone; Lightning's loop against a bare PyTorch loop.

Variants of one shape share one module (precision and checkpointing are switched between steps), and
their steps are interleaved round by round. FLOPs come from ``FlopCounterMode`` over forward + backward
with diffusers' plain ``AttnProcessor`` (attention as ``bmm``, which the counter sees; CPU SDPA kernels it
does not), without the recomputation of checkpointing (model FLOPs, as MFU counts them). Peak memory is
the largest total of live tensors in one step (weights, gradients, optimizer state, activations; a dispatch-mode
count of live storages on CPU, the allocator peak on CUDA) — not the process RSS.
"""

from __future__ import annotations

import itertools
import time
import weakref
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

from train.data.transforms import normalize_batch
from train.module import BrushNetTrainingModule
from train.optim import build_optimizer
from train.tools.bench.common import interleaved, median, spread
from train.tools.bench.limits import sync

PRECISIONS = ("fp32", "bf16")


def set_variant(module: BrushNetTrainingModule, precision: str, checkpointing: bool) -> None:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if module.weight_dtype != dtype:
        for frozen in module.frozen_models():
            frozen.to(dtype)
        module.weight_dtype = dtype
    for model in (module.unet, module.brushnet):
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
    module.train()


def train_step(
    module: BrushNetTrainingModule, batch: dict, opt: torch.optim.Optimizer, precision: str
) -> None:
    device = batch["pixel_values"].device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with ctx:
        loss = module.compute_loss(normalize_batch(batch), module.step_generator(0))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(device)


def step_flops(module: BrushNetTrainingModule, batch: dict) -> int:
    """Forward + backward FLOPs of one fp32 step (no optimizer, no recomputation)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    set_variant(module, "fp32", False)
    saved = {
        a: a.processor
        for m in (module.unet, module.brushnet)
        for a in m.modules()
        if isinstance(a, Attention)
    }
    for attention in saved:
        attention.set_processor(AttnProcessor())
    try:
        with FlopCounterMode(display=False) as counter:
            module.compute_loss(normalize_batch(batch), module.step_generator(0)).backward()
    finally:
        for attention, processor in saved.items():
            attention.set_processor(processor)
    module.brushnet.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages (each storage once, views included) and their peak, for the ops run
    under this mode plus the ``tensors`` given at the start; a storage leaves when it is freed."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        for t in tensors:
            self.track(t)

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.sizes or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self.refs[key] = weakref.ref(storage, lambda _, k=key: self._free(k))

    def _free(self, key: int) -> None:
        self.current -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def peak_memory(
    module: BrushNetTrainingModule, batch: dict, opt: torch.optim.Optimizer, precision: str
) -> int:
    """Peak bytes of live tensors over one step (after a warm-up step made the optimizer state)."""
    device = batch["pixel_values"].device
    train_step(module, batch, opt, precision)  # warm-up: optimizer state, lazy buffers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        train_step(module, batch, opt, precision)
        return int(torch.cuda.max_memory_allocated(device))
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    batch_tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    existing = list(module.parameters()) + list(module.buffers()) + state + batch_tensors
    with LiveTensorBytes(existing) as tracker:
        train_step(module, batch, opt, precision)
    return tracker.peak


def bench_steps(
    module: BrushNetTrainingModule,
    batch: dict,
    optimizers: tuple[str, ...],
    repeats: int,
    peak_flops: dict[str, float],
    memory: bool = True,
) -> list[dict]:
    """Every (optimizer, precision, checkpointing) variant: median s/step, FLOP/s, fraction of the matmul
    peak of its dtype, peak tensor memory."""
    flops = step_flops(module, batch)
    params = [p for p in module.brushnet.parameters() if p.requires_grad]
    rows = []
    for name in optimizers:  # one optimizer state at a time (SD1.5: 5 GB for AdamW)
        opt = build_optimizer(params, name, lr=1e-5)
        variants = {
            (p, c): (lambda p=p, c=c, o=opt: (set_variant(module, p, c), train_step(module, batch, o, p))[0])
            for p in PRECISIONS
            for c in (False, True)
        }
        variants.update(_matmuls(batch["pixel_values"].device))
        times = _timed_interleaved(variants, repeats)
        mm = {p: _MM_FLOPS / median(times.pop(f"mm_{p}")) for p in PRECISIONS}
        mem = {}
        if memory:
            for p, c in itertools.product(PRECISIONS, (False, True)):
                set_variant(module, p, c)
                mem[(p, c)] = peak_memory(module, batch, opt, p)
        for (p, c), t in times.items():
            s = median(t)
            row = {
                "optimizer": name,
                "precision": p,
                "checkpointing": c,
                "s_per_step": s,
                "range": spread(t),
                "tflop_per_step": flops / 1e12,
                "tflops": flops / s / 1e12,
                "fraction_of_matmul_peak": flops / s / peak_flops[p],
                # the same against torch.mm timed in the same rounds (the load of a shared machine cancels)
                "fraction_of_interleaved_mm": flops / s / mm[p],
                "interleaved_mm_flops": mm[p],
            }
            if memory:
                row["peak_tensor_gib"] = mem[(p, c)] / 2**30
            rows.append(row)
        del opt
        for p in params:
            p.grad = None
    set_variant(module, "fp32", False)
    return rows


_MM_N = 1024
_MM_FLOPS = 2 * _MM_N**3


def _matmuls(device: torch.device) -> dict[str, Any]:
    """torch.mm variants to time among the steps, one per precision."""
    mats = {p: torch.randn(2, _MM_N, _MM_N, device=device) for p in PRECISIONS}
    mats["bf16"] = mats["bf16"].bfloat16()

    def mm(p: str) -> None:
        torch.mm(mats[p][0], mats[p][1])
        sync(device)

    return {f"mm_{p}": (lambda p=p: mm(p)) for p in PRECISIONS}


def _timed_interleaved(variants: dict[Any, Any], repeats: int) -> dict[Any, list[float]]:
    def timed(fn):
        def run() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return run

    return interleaved({k: timed(fn) for k, fn in variants.items()}, repeats)


def bench_optimizer_step(module: BrushNetTrainingModule, repeats: int) -> dict[str, dict]:
    """``opt.step()`` alone on the branch with fixed gradients: fused / foreach / for-loop AdamW (one state,
    the implementation switched between steps) and bitsandbytes AdamW8bit, interleaved."""
    params = [p for p in module.brushnet.parameters() if p.requires_grad]
    g = torch.Generator(device=params[0].device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=p.device) * 1e-3
    adamw = build_optimizer(params, "adamw", lr=1e-5)
    impl = {"fused": (True, False), "foreach": (False, True), "for-loop": (False, False)}
    device = params[0].device

    def adamw_step(kind: str) -> None:
        for group in adamw.param_groups:
            group["fused"], group["foreach"] = impl[kind]
        adamw.step()
        sync(device)

    variants = {k: (lambda k=k: adamw_step(k)) for k in impl}
    try:
        eight = build_optimizer(params, "adamw8bit", lr=1e-5)
        variants["adamw8bit"] = lambda: (eight.step(), sync(device))[0]
    except ImportError:
        pass
    times = _timed_interleaved(variants, repeats)
    for p in params:
        p.grad = None
    numel = sum(p.numel() for p in params)
    return {k: {"s": median(t), "range": spread(t), "params": numel} for k, t in times.items()}
