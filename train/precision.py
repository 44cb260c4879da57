"""Precision checks that depend on the hardware: bf16 on a CPU without native bf16 instructions."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_warned: set[str] = set()


def cpu_has_native_bf16() -> bool:
    """True if oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX). Without them bf16 matmuls
    and convolutions are emulated in fp32 and much slower than fp32 itself (the small config's step went
    from 0.3 s to 3.8 s with oneDNN capped to AVX2)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_emulated_bf16(precision: str | int | None, device: torch.device) -> bool:
    """Log one WARNING per process when a bf16 precision runs on a CPU without native bf16; returns whether
    it warned."""
    if device.type != "cpu" or "bf16" not in str(precision) or cpu_has_native_bf16():
        return False
    if "cpu-bf16" in _warned:
        return False
    _warned.add("cpu-bf16")
    log.warning(
        "precision %s on a CPU without native bf16 (oneDNN reports no AVX512-BF16/AMX): bf16 kernels are "
        "emulated and usually slower than 32-true here",
        precision,
    )
    return True


_PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "fp16": torch.float16}


def weight_dtype_for(precision: str | int | None) -> torch.dtype:
    """Dtype of the frozen models for a Lightning precision: bf16 for ``bf16-*``, fp16 for ``16-*``."""
    return _PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)
