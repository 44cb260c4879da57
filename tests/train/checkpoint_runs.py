"""Helpers for the checkpoint and resume tests: run the installed ``brushnet-train`` console script on tiny
data (as a user does), and read what a run left in its checkpoints."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tests.train.cli_runs import cli_args, overlay, tiny_data

ROOT = Path(__file__).resolve().parents[2]
BRUSHNET_TRAIN = Path(sys.executable).with_name("brushnet-train")


def _env(**more: str) -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NO_ALBUMENTATIONS_UPDATE="1",
        TOKENIZERS_PARALLELISM="false",
        **more,
    )


def _limits(umask: int | None, max_file_bytes: int | None):
    def apply() -> None:
        if umask is not None:
            os.umask(umask)
        if max_file_bytes is not None:  # a full disk: writes past this size fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return apply


@dataclass
class Setup:
    """The tiny base, tiny data and a config overlay shared by the runs of one test module."""

    base: Path
    data: Path
    config: Path

    def train(
        self,
        run: Path,
        *more: str,
        umask: int | None = None,
        max_file_bytes: int | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess:
        """``brushnet-train fit`` into ``run`` (not checked: the caller asserts the exit status)."""
        return subprocess.run(
            [str(BRUSHNET_TRAIN), *cli_args(self.base, self.data, run, self.config, *more)],
            cwd=ROOT,
            env=_env(**(env or {})),
            timeout=timeout,
            capture_output=True,
            text=True,
            preexec_fn=_limits(umask, max_file_bytes),
        )

    def train_ok(self, run: Path, *more: str, **kwargs) -> subprocess.CompletedProcess:
        done = self.train(run, *more, **kwargs)
        assert done.returncode == 0, done.stderr[-4000:]
        return done


def setup(folder: Path, base: Path, every: int, **model) -> Setup:
    """Two shards of 6 samples (batch 2: 6 steps an epoch) and the shared overlay (``save_top_k=2``), without
    the throughput monitor (nothing here reads it)."""
    config = overlay(folder / "o.yaml", every=every, **model)
    cfg = yaml.safe_load(config.read_text())
    callbacks = cfg["trainer"]["callbacks"]
    cfg["trainer"]["callbacks"] = [c for c in callbacks if not c["class_path"].startswith("train.monitor.")]
    config.write_text(yaml.safe_dump(cfg))
    return Setup(base, tiny_data(folder / "data"), config)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def trained_tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Branch + EMA weights and every optimizer state tensor of a Lightning checkpoint."""
    out = {f"state_dict.{k}": v for k, v in checkpoint["state_dict"].items()}
    for i, opt in enumerate(checkpoint["optimizer_states"]):
        for p, state in opt["state"].items():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer{i}.{p}.{name}"] = value
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between the trained tensors of two checkpoints (same keys expected)."""
    ta, tb = trained_tensors(a), trained_tensors(b)
    assert ta.keys() == tb.keys()
    return max(float((x.double() - tb[k].double()).abs().max()) for k, x in ta.items())


def copy_run(source: Path, target: Path) -> Path:
    """A copy of a run folder as ``cp -r`` makes it: new mtimes, in copy order."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    return target


def weight_offset(path: Path, key: str) -> int:
    """Byte offset of the stored data of state_dict tensor ``key`` inside the checkpoint file."""
    tensor = load(path)["state_dict"][key]
    raw = tensor.contiguous().numpy().tobytes()
    offset = path.read_bytes().find(raw)
    assert offset > 0, key
    return offset
