"""Exact resume after a real SIGKILL, and DDP on 2 CPU processes (gloo), through ``python -m train``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from brushnet.model import BrushNetModel
from tests.train.cli_runs import cli_args, overlay, tiny_data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        NO_ALBUMENTATIONS_UPDATE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def with_recorder(cfg: Path, folder: Path, pause_at_step: int | None = None) -> Path:
    data = yaml.safe_load(cfg.read_text())
    data["trainer"]["callbacks"].append(
        {
            "class_path": "tests.train.recorders.BatchRecorder",
            "init_args": {"folder": str(folder), "pause_at_step": pause_at_step},
        }
    )
    out = cfg.with_name(f"{cfg.stem}-{folder.name}.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def run_cli(args: list[str], timeout: float = 240) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=_env(),
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def keys(folder: Path, rank: int = 0) -> list[tuple[int, list[str]]]:
    lines = (folder / f"batches-rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["keys"]) for r in map(json.loads, lines)]


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_base_sd15):
    data = tiny_data(tmp_path / "data")
    base_cfg = overlay(tmp_path / "o.yaml", every=3, ema=True)
    n = 3
    full_rec, split_rec = tmp_path / "rec-full", tmp_path / "rec-split"
    run_cli(
        cli_args(
            tiny_base_sd15,
            data,
            tmp_path / "full",
            with_recorder(base_cfg, full_rec),
            f"--trainer.max_steps={2 * n}",
        )
    )

    # the same run, SIGKILLed while step n+1 starts (checkpoint of step n on disk), then resumed
    args = cli_args(
        tiny_base_sd15,
        data,
        tmp_path / "split",
        with_recorder(base_cfg, split_rec, n),
        f"--trainer.max_steps={2 * n}",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (split_rec / "paused").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it paused"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    resume = cli_args(
        tiny_base_sd15,
        data,
        tmp_path / "split",
        with_recorder(base_cfg, split_rec),
        f"--trainer.max_steps={2 * n}",
        "--ckpt_path=last",
    )
    run_cli(resume)

    assert keys(split_rec) == keys(full_rec)  # the same samples in the same order, step by step
    for name in ("brushnet", "brushnet_ema"):
        a = BrushNetModel.from_pretrained(tmp_path / "full" / "export" / f"step-{2 * n:08d}" / name)
        b = BrushNetModel.from_pretrained(tmp_path / "split" / "export" / f"step-{2 * n:08d}" / name)
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), (name, k)


def test_ddp_two_cpu_processes(tmp_path, tiny_base_sd15):
    data = tiny_data(tmp_path / "data")
    rec = tmp_path / "rec"
    cfg = with_recorder(overlay(tmp_path / "o.yaml", every=2, validate_every=2, ema=True), rec)
    run = tmp_path / "run"
    run_cli(
        cli_args(
            tiny_base_sd15,
            data,
            run,
            cfg,
            "--trainer.max_steps=4",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
        ),
        timeout=400,
    )
    r0, r1 = keys(rec, 0), keys(rec, 1)
    assert [s for s, _ in r0] == [s for s, _ in r1] == [1, 2, 3, 4]  # equal step counts
    seen0 = {k for _, ks in r0 for k in ks}
    seen1 = {k for _, ks in r1 for k in ks}
    assert not seen0 & seen1 or len(seen0 | seen1) == 12  # ranks read distinct samples within an epoch
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    exported = BrushNetModel.from_pretrained(run / "export" / "step-00000004" / "brushnet")
    for k, v in exported.state_dict().items():
        assert torch.equal(ckpt["state_dict"][f"brushnet.{k}"], v), k
    assert (run / "logs" / "version_0" / "validation" / "step-00000002" / "00.png").is_file()
