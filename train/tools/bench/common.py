"""Timing helpers shared by the benchmark parts: interleaved repeats, medians, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def interleaved(variants: dict[str, Callable[[], float | None]], repeats: int, warmup: int = 1) -> dict:
    """Run every variant ``warmup`` times, then ``repeats`` rounds of all variants in turn (so a slow phase
    of a shared machine hits all of them alike). A variant returns its own measurement (e.g. samples/s)
    or None to be timed in seconds. Returns ``{name: [values...]}``."""
    out: dict[str, list[float]] = {name: [] for name in variants}

    def once(fn: Callable[[], float | None]) -> float:
        start = time.perf_counter()
        value = fn()
        return time.perf_counter() - start if value is None else float(value)

    for _ in range(warmup):
        for fn in variants.values():
            once(fn)
    for _ in range(repeats):
        for name, fn in variants.items():
            out[name].append(once(fn))
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> list[float]:
    """[min, max] of the repeats, for the JSON (how noisy the median is)."""
    return [float(min(values)), float(max(values))]


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_1min": os.getloadavg()[0],
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()
