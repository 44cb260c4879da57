"""The training CLI end to end on a tiny base and tiny real data: checkpoints, exports, grids, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from brushnet.console import one_line
from brushnet.model import BrushNetModel
from brushnet.pipeline import BrushNetInpaintPipeline
from tests.train.cli_runs import TINY_CONFIG, cli_args, overlay, tiny_data
from train.cli import build_cli, main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def _metrics(log_dir) -> list[dict]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_fit_checkpoints_exports_grids_and_resumes(tmp_path, tiny_base_sd15, data):
    run = tmp_path / "run"
    cfg = overlay(tmp_path / "o.yaml", every=2, validate_every=4)
    cli = build_cli(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=4"))
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 4
    # the link: the DataModule's tokenizer is the model's base
    assert cli.datamodule.tokenizer == str(tiny_base_sd15)
    log_dir = run / "logs" / "version_0"
    saved = (log_dir / "config.yaml").read_text()
    assert str(tiny_base_sd15) in saved and "BrushNetCheckpoint" in saved  # the resolved config
    assert not {"optimizer", "lr_scheduler"} & set(yaml.safe_load(saved))  # only model.optimizer chooses
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
        "train/device/samples_per_sec",
        "train/grad_norm",
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
        image=np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),
        mask=mask,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)

    # ckpt_path=last resumes at step 4 and goes on
    again = build_cli(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=6", "--ckpt_path=last"))
    assert again.trainer.global_step == 6
    assert again.trainer.ckpt_path.endswith("last.ckpt")
    kept = sorted(p.name for p in (run / "export").iterdir())
    assert kept == ["step-00000004", "step-00000006"]  # pruned to save_top_k


def test_adamw8bit_resume_is_exact(tmp_path, tiny_base_sd15, data):
    """AdamW8bit (bitsandbytes on CPU): 4 steps == 2 steps + resume 2, bit for bit (resumed with
    ``--ckpt_path auto``, which finds ``last.ckpt``; the first run finds nothing and starts fresh)."""
    cfg = overlay(tmp_path / "o.yaml", every=2, ema=False, optimizer="adamw8bit")
    full = build_cli(cli_args(tiny_base_sd15, data, tmp_path / "full", cfg, "--trainer.max_steps=4")).model
    assert type(full.trainer.optimizers[0]).__name__ == "AdamW8bit"
    first = build_cli(
        cli_args(tiny_base_sd15, data, tmp_path / "split", cfg, "--trainer.max_steps=2", "--ckpt_path=auto")
    )
    assert first.trainer.ckpt_path is None
    resumed = build_cli(
        cli_args(tiny_base_sd15, data, tmp_path / "split", cfg, "--trainer.max_steps=4", "--ckpt_path=auto")
    )
    assert resumed.trainer.ckpt_path.endswith("last.ckpt")
    resumed = resumed.model
    for (k, a), b in zip(full.brushnet.state_dict().items(), resumed.brushnet.state_dict().values()):
        assert torch.equal(a, b), k


def test_nan_stop_never_overwrites_a_good_checkpoint(tmp_path, tiny_base_sd15, data, monkeypatch):
    cfg = overlay(tmp_path / "o.yaml", every=2, ema=False, nan_policy="stop")
    run = tmp_path / "run"
    build_cli(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=2"))
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    from train.module import BrushNetTrainingModule, NonFiniteLossError

    real = BrushNetTrainingModule.compute_loss
    monkeypatch.setattr(
        BrushNetTrainingModule, "compute_loss", lambda self, *a, **k: real(self, *a, **k) * float("nan")
    )
    with pytest.raises(NonFiniteLossError, match="nan_policy='stop'"):
        build_cli(cli_args(tiny_base_sd15, data, run, cfg, "--trainer.max_steps=4", "--ckpt_path=last"))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == good


def test_resume_from_a_named_checkpoint_keeps_the_command_line(tmp_path, tiny_base_sd15, data):
    """``--ckpt_path FILE`` resumes the state but not the hyperparameters stored in the file (Lightning's
    LightningCLI would replace ``--model.noise_offset`` with the checkpoint's), as ``--ckpt_path last``."""
    cfg = overlay(tmp_path / "o.yaml", every=2, ema=False)
    build_cli(cli_args(tiny_base_sd15, data, tmp_path / "run", cfg, "--trainer.max_steps=2"))
    step2 = tmp_path / "run" / "checkpoints" / "step-00000002.ckpt"
    more = ("--trainer.max_steps=3", "--model.noise_offset=0.25", f"--ckpt_path={step2}")
    resumed = build_cli(cli_args(tiny_base_sd15, data, tmp_path / "run", cfg, *more))
    assert resumed.trainer.global_step == 3
    assert resumed.model.hparams.noise_offset == 0.25


def _seeded_run(tmp_path: Path, base: Path, data: Path, seed: int, name: str):
    """One step at learning rate 0 with ``--seed_everything=seed``: the batch keys, the step's first noise
    draws and the validation grid (the weights stay the initial ones, so only the seeds differ)."""
    cfg = yaml.safe_load(overlay(tmp_path / f"{name}.yaml", every=1000, validate_every=1).read_text())
    record = tmp_path / f"{name}-batches"
    cfg["trainer"]["callbacks"].append(
        {"class_path": "tests.train.recorders.BatchRecorder", "init_args": {"folder": str(record)}}
    )
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / name
    args = [f"--seed_everything={seed}", "--model.learning_rate=0", "--trainer.max_steps=1"]
    cli = build_cli(cli_args(base, data, run, tmp_path / f"{name}.yaml", *args))
    assert cli.model.hparams.seed == cli.datamodule.seed == seed  # linked to --seed_everything
    keys = [json.loads(line)["keys"] for line in (record / "batches-rank0.jsonl").read_text().splitlines()]
    noise = torch.randn(8, generator=cli.model.step_generator(0))
    grid = np.asarray(PIL.Image.open(run / "logs" / "version_0" / "validation" / "step-00000001" / "00.png"))
    weights = torch.cat([p.detach().flatten() for p in cli.model.brushnet.parameters()])
    return keys, noise, grid, weights


def test_seed_everything_drives_batches_noise_and_validation(tmp_path, tiny_base_sd15, data):
    a = _seeded_run(tmp_path, tiny_base_sd15, data, 1, "a")
    b = _seeded_run(tmp_path, tiny_base_sd15, data, 1, "b")
    c = _seeded_run(tmp_path, tiny_base_sd15, data, 2, "c")
    assert torch.equal(a[3], c[3])  # lr 0: the same weights, so grids differ only by their seed
    assert a[0] == b[0] and a[0] != c[0]  # batches (data.seed)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])  # noise (model.seed)
    assert np.array_equal(a[2], b[2]) and not np.array_equal(a[2], c[2])  # ValidationGrids(seed=None)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer=torch.optim.SGD"], "--optimizer"),  # LightningCLI's group: --model.optimizer only
        (["--lr_scheduler=torch.optim.lr_scheduler.StepLR"], "--lr_scheduler"),
        (["--model.seed=3"], "seed_everything"),  # one seed: model.seed and data.seed follow it
        (["--data.seed=3"], "seed_everything"),
        (["--trainer.logger.init_args.save_dir=elsewhere"], "default_root_dir"),  # loggers write in the run
        (["--seed_everything=true"], "seed_everything"),  # a random seed would change on every rerun
        (["--model.learning_rate=abc"], 'Parser key "model.learning_rate"'),  # one line, not the usage
    ],
)
def test_command_line_refuses_a_second_way(args, message, capsys):
    assert main(["fit", f"--config={TINY_CONFIG}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("brushnet-train: error:") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_only_fit_is_offered(subcommand, capsys):
    assert main([subcommand, f"--config={TINY_CONFIG}"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--data.train_shards={tmp}/none.tar", "none.tar does not exist"),
        ("--data.train_shards={tmp}/garbage.tar", "garbage.tar"),
        ("--ckpt_path={tmp}/none.ckpt", "none.ckpt"),
        ("--ckpt_path={tmp}/empty.ckpt", "empty.ckpt"),  # train.checkpoint_io.CheckpointError
        ("--model.ema_decay=2", "ema_decay must be in (0, 1)"),
        ("--model.pretrained_model_name_or_path={tmp}/no-base", "no-base"),
    ],
)
def test_expected_errors_are_one_line_and_exit_2(
    arg, message, tmp_path, tiny_base_sd15, data, capsys, monkeypatch
):
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cfg = overlay(tmp_path / "o.yaml")
    args = cli_args(
        tiny_base_sd15, data, tmp_path / "run", cfg, "--trainer.max_steps=1", arg.format(tmp=tmp_path)
    )
    monkeypatch.delenv("BRUSHNET_DEBUG", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("brushnet-train: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err[-3000:]
    monkeypatch.setenv("BRUSHNET_DEBUG", "1")  # the traceback on request
    with pytest.raises(Exception) as raised:
        main(args)
    assert message in one_line(raised.value)
