"""The training CLI end to end on a tiny base and tiny real data: checkpoints, exports, grids, resume."""

from __future__ import annotations

import csv

import numpy as np
import PIL.Image
import pytest
import torch

from brushnet.model import BrushNetModel
from brushnet.pipeline import BrushNetInpaintPipeline
from tests.train.cli_runs import cli_args, overlay, tiny_data
from train.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def _metrics(log_dir) -> list[dict]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_checkpoints_exports_grids_and_resumes(tmp_path, tiny_base_sd15, data):
    run = tmp_path / "run"
    cfg = overlay(tmp_path / "o.yaml", every=2, validate_every=4)
    cli = main(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=4"))
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 4
    # the link: the DataModule's tokenizer is the model's base
    assert cli.datamodule.tokenizer == str(tiny_base_sd15)
    log_dir = run / "logs" / "version_0"
    saved = (log_dir / "config.yaml").read_text()
    assert str(tiny_base_sd15) in saved and "BrushNetCheckpoint" in saved  # the resolved config
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))  # (+ a .sha256 sidecar each)
    assert ckpts == ["last.ckpt", "step-00000002.ckpt", "step-00000004.ckpt"], ckpts
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith(("brushnet.", "ema.")) for k in state)  # no frozen base inside
    exported = run / "export" / "step-00000004"
    branch = BrushNetModel.from_pretrained(exported / "brushnet")
    ema = BrushNetModel.from_pretrained(exported / "brushnet_ema")
    for (k, v), (_, e) in zip(module.brushnet.state_dict().items(), module.ema.state_dict().items()):
        assert torch.equal(branch.state_dict()[k], v), k
        assert torch.equal(ema.state_dict()[k], e), k
    assert not any(p.name.startswith(".") for p in (run / "export").iterdir())  # no temp leftovers
    grid = PIL.Image.open(log_dir / "validation" / "step-00000004" / "00.png")
    # masked input | mask | output | blended | ground truth, 32 px panels upscaled x6, label and caption bars
    assert grid.size == (5 * 32 * 6, 32 * 6 + 2 * 18)
    rows = _metrics(log_dir)
    logged = {k for r in rows for k, v in r.items() if v}
    assert {
        "train/loss",
        "train/samples_per_s",
        "train/peak_mem_gb",
        "train/lr",
        "train/bad_samples",
    } <= logged

    # the export runs in the inference pipeline
    pipe = BrushNetInpaintPipeline.from_base(tiny_base_sd15, exported / "brushnet")
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    out = pipe(
        prompt="a cat",
        image=np.asarray(grid)[:, :32],
        mask=mask,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)

    # ckpt_path=last resumes at step 4 and goes on
    again = main(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=6", "--ckpt_path=last"))
    assert again.trainer.global_step == 6
    assert again.trainer.ckpt_path.endswith("last.ckpt")
    kept = sorted(p.name for p in (run / "export").iterdir())
    assert kept == ["step-00000004", "step-00000006"]  # pruned to save_top_k


def test_adamw8bit_resume_is_exact(tmp_path, tiny_base_sd15, data):
    """AdamW8bit (bitsandbytes on CPU): 4 steps == 2 steps + resume 2, bit for bit (resumed with
    ``--ckpt_path auto``, which finds ``last.ckpt``; the first run finds nothing and starts fresh)."""
    cfg = overlay(tmp_path / "o.yaml", every=2, ema=False, optimizer="adamw8bit")
    full = main(cli_args(tiny_base_sd15, data, tmp_path / "full", cfg, "--trainer.max_steps=4")).model
    assert type(full.trainer.optimizers[0]).__name__ == "AdamW8bit"
    first = main(
        cli_args(tiny_base_sd15, data, tmp_path / "split", cfg, "--trainer.max_steps=2", "--ckpt_path=auto")
    )
    assert first.trainer.ckpt_path is None
    resumed = main(
        cli_args(tiny_base_sd15, data, tmp_path / "split", cfg, "--trainer.max_steps=4", "--ckpt_path=auto")
    )
    assert resumed.trainer.ckpt_path.endswith("last.ckpt")
    resumed = resumed.model
    for (k, a), b in zip(full.brushnet.state_dict().items(), resumed.brushnet.state_dict().values()):
        assert torch.equal(a, b), k


def test_nan_stop_never_overwrites_a_good_checkpoint(tmp_path, tiny_base_sd15, data, monkeypatch):
    cfg = overlay(tmp_path / "o.yaml", every=2, ema=False, nan_policy="stop")
    run = tmp_path / "run"
    main(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=2"))
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    from train.module import BrushNetTrainingModule, NonFiniteLossError

    real = BrushNetTrainingModule.compute_loss
    monkeypatch.setattr(
        BrushNetTrainingModule, "compute_loss", lambda self, *a, **k: real(self, *a, **k) * float("nan")
    )
    with pytest.raises(NonFiniteLossError, match="nan_policy='stop'"):
        main(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=4", "--ckpt_path=last"))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == good
