"""8-bit AdamW that works on FSDP2-sharded (DTensor) parameters, with checkpointable sharded state.

bitsandbytes' ``AdamW8bit`` fails on DTensor parameters ("got mixed torch.Tensor and DTensor"). Adam(W) is
element-wise, so each rank can run the bitsandbytes 8-bit blockwise update on its **local shard**
(``DTensor.to_local()`` shares storage with the parameter) with the local gradient shard. The math per
element is bitsandbytes' (same kernels, same dynamic quantization maps, blocksize 256, 32-bit state for
tensors under ``min_8bit_size`` elements); the only difference from an unsharded ``AdamW8bit`` is where the
quantization blocks fall: they tile each rank's shard instead of the whole tensor, so results are close to,
not bit-identical with, a DDP run.

State layout (what ``torch.distributed.checkpoint`` saves, one file per rank):

* ``state1`` / ``state2``: uint8 codes (or fp32 moments for small tensors) as DTensors with the
  parameter's own shape and placements, so DCP stores each rank's shard;
* ``absmax1`` / ``absmax2``: per-block scales as a ``(num_shards, max_blocks_per_shard)`` DTensor sharded
  on dim 0 (one padded row per shard), because blocks are defined per shard;
* ``qmap1`` / ``qmap2`` and ``step``: identical on every rank (replicated plain tensors).

Consequence of per-shard blocks: a checkpoint resumes on the **same number of shards** only; loading it
with another world size raises (the absmax rows no longer match the shards).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

BLOCKSIZE = 256  # bitsandbytes blockwise 8-bit optimizers (Optimizer2State.init_state)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _num_shards(p: DTensor) -> int:
    """How many distinct shards of ``p`` exist (product of mesh dims that shard it on dim 0)."""
    n = 1
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            n *= p.device_mesh.size(dim)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"ShardedAdamW8bit supports Shard(0)/Replicate placements (FSDP2/HSDP), got {p.placements}"
            )
    return n


class ShardedAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes ``AdamW8bit`` semantics, applied per local shard; also accepts plain tensors."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid ShardedAdamW8bit hyper-parameters: lr={lr} betas={betas} eps={eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.min_8bit_size = min_8bit_size

    # -- state ------------------------------------------------------------------------------------
    @staticmethod
    def _like(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        local = torch.zeros_like(_local(p), dtype=dtype)
        if not isinstance(p, DTensor):
            return local
        return DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )

    @staticmethod
    def _absmax(p: torch.Tensor) -> torch.Tensor:
        if not isinstance(p, DTensor):
            return torch.zeros(math.ceil(p.numel() / BLOCKSIZE), dtype=torch.float32, device=p.device)
        n = _num_shards(p)
        rows = math.ceil(p.shape[0] / n) if p.ndim else 1
        width = max(1, math.ceil(rows * (p.numel() // max(p.shape[0], 1) if p.ndim else 1) / BLOCKSIZE))
        local = torch.zeros((1, width), dtype=torch.float32, device=_local(p).device)
        return DTensor.from_local(
            local, p.device_mesh, p.placements, run_check=False, shape=(n, width), stride=(width, 1)
        )

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        import bitsandbytes.functional as F

        device = _local(p).device
        state["step"] = torch.zeros((), dtype=torch.float32)
        if p.numel() < self.min_8bit_size:
            state["state1"], state["state2"] = self._like(p, torch.float32), self._like(p, torch.float32)
            return
        state["state1"], state["state2"] = self._like(p, torch.uint8), self._like(p, torch.uint8)
        state["qmap1"] = F.create_dynamic_map(signed=True).to(device)
        state["qmap2"] = F.create_dynamic_map(signed=False).to(device)
        state["absmax1"], state["absmax2"] = self._absmax(p), self._absmax(p)

    # -- update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        import bitsandbytes.functional as F

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                if state["step"].device.type != "cpu":  # moved by Lightning's optimizer-to-device
                    state["step"] = state["step"].cpu()  # keep .item() below free of a GPU sync
                state["step"] += 1
                param, grad = _local(p), _local(p.grad)
                if param.numel() == 0:  # this rank holds no element of a tiny tensor
                    continue
                if not (param.is_contiguous() and grad.is_contiguous()):
                    raise RuntimeError("ShardedAdamW8bit needs contiguous local shards (FSDP2 gives them)")
                step = int(state["step"].item())
                s1, s2 = _local(state["state1"]), _local(state["state2"])
                if s1.dtype == torch.float32:
                    F.optimizer_update_32bit(
                        "adam", grad, param, s1, beta1, eps, step, lr, s2, beta2, 0.0, 0.0, wd, 1.0, None
                    )
                    continue
                blocks = math.ceil(param.numel() / BLOCKSIZE)
                a1 = _local(state["absmax1"]).view(-1)[:blocks]
                a2 = _local(state["absmax2"]).view(-1)[:blocks]
                F.optimizer_update_8bit_blockwise(
                    "adam", grad, param, s1, s2, beta1, beta2, 0.0, 0.0, eps, step, lr,
                    state["qmap1"], state["qmap2"], a1, a2, wd, gnorm_scale=1.0,
                )  # fmt: skip
        return loss

    # -- checkpoint -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then restore the dtypes ``torch.optim`` casts to the parameter dtype, and check layout."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                eight_bit = "absmax1" in state
                for key in ("state1", "state2"):
                    state[key] = state[key].to(torch.uint8 if eight_bit else torch.float32)
                for key in ("absmax1", "absmax2", "qmap1", "qmap2"):
                    if key in state:
                        state[key] = state[key].to(torch.float32)
                if eight_bit:
                    expected = self._absmax(p).shape
                    if tuple(state["absmax1"].shape) != tuple(expected):
                        raise ValueError(
                            f"ShardedAdamW8bit state has absmax shape {tuple(state['absmax1'].shape)} but this "
                            f"run needs {tuple(expected)}: 8-bit state is quantized per shard and resumes "
                            "only on the same number of FSDP shards"
                        )


def make_sharded_adamw8bit(params, **kwargs: Any) -> ShardedAdamW8bit:
    """Factory for ``train/optim.py``: use when parameters are DTensors (``train.fsdp.is_sharded``)."""
    return ShardedAdamW8bit(params, **kwargs)
