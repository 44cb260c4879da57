"""The device's limits the step is measured against: dense matmul FLOP/s per dtype and memory bandwidth."""

from __future__ import annotations

import torch

from train.tools.bench.common import interleaved, median, spread


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int, repeats: int) -> dict[str, dict]:
    """``torch.mm`` of two n x n matrices, fp32 and bf16, interleaved: FLOP/s = 2 n^3 / seconds."""
    mats = {
        dtype: (torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
        for dtype in (torch.float32, torch.bfloat16)
    }

    def run(dtype: torch.dtype) -> None:
        a, b = mats[dtype]
        torch.mm(a, b)
        sync(device)

    runs = interleaved({str(d).split(".")[1]: (lambda d=d: run(d)) for d in mats}, repeats, warmup=2)
    return {
        name: {"flops": 2 * n**3 / median(t), "range": [2 * n**3 / x for x in reversed(spread(t))], "n": n}
        for name, t in runs.items()
    }


def memory_bandwidth(device: torch.device, mib: int, repeats: int) -> dict:
    """Bytes read + written per second by a large fp32 copy (``dst.copy_(src)``)."""
    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        sync(device)

    times = interleaved({"copy": run}, repeats, warmup=2)["copy"]
    moved = 2 * src.numel() * src.element_size()
    return {
        "bytes_per_s": moved / median(times),
        "range": [moved / x for x in reversed(spread(times))],
        "mib": mib,
    }


def limits(device: torch.device, quick: bool, repeats: int) -> dict:
    n = 8192 if device.type == "cuda" else 2048 if quick else 4096
    return {
        "matmul": matmul_flops(device, n, repeats),
        "memory": memory_bandwidth(device, 256 if quick else 1024, repeats),
    }
