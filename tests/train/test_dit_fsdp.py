"""FSDP2 on a DiT base: 2 CPU processes (gloo) through the installed ``brushnet-train`` with
``configs/fsdp_cpu.yaml``: one unit per transformer block of the frozen base and of the branch, 8-bit AdamW
on the shards, EMA, sharded checkpoints without the frozen base, exports on every checkpoint, validation
grids rendered by all ranks, and an exact resume of the branch from a sharded checkpoint."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader

from brushnet.dit.family import FAMILIES
from brushnet.dit.loading import load_dit_branch
from tests.train.checkpoint_runs import BRUSHNET_TRAIN, ROOT, _env
from tests.train.cli_runs import tiny_data
from tests.train.dit_runs import CONFIGS, dit_base
from train.fsdp import _BLOCK_CLASS_NAMES

pytestmark = pytest.mark.slow


def test_families_blocks_are_fsdp_units():
    for family in FAMILIES.values():
        assert set(family.block_class_names) <= set(_BLOCK_CLASS_NAMES)


@pytest.mark.parametrize("family", ["flux"])
def test_fsdp2_two_processes_train_checkpoint_export_and_resume_bit_identical(
    family, tmp_path, tmp_path_factory
):
    base = dit_base(tmp_path_factory, family)
    data = tiny_data(tmp_path / "data")

    def fit(run: str, *extra: str) -> Path:
        root = tmp_path / run
        overlay = {
            "model": {"optimizer": "adamw8bit", "ema_decay": 0.9},
            "data": {"resolution": 32, "batch_size": 2},
            "trainer": {
                "max_steps": 4,
                "logger": False,
                "callbacks": [
                    {
                        "class_path": "train.checkpointing.BrushNetCheckpoint",
                        "init_args": {
                            "dirpath": str(root / "ckpt"),
                            "every_n_train_steps": 2,
                            "save_top_k": -1,
                            "keep_exports": 2,
                        },
                    },
                    {
                        "class_path": "train.validation.ValidationGrids",
                        "init_args": {
                            "every_n_steps": 2,
                            "resolution": 32,
                            "num_inference_steps": 2,
                            "out_dir": str(root / "grids"),
                            "barrier_timeout_s": 60,
                            "samples": [
                                {"image": "skimage:coffee", "mask": "box:0.2,0.2,0.6,0.6", "prompt": "x"}
                            ],
                        },
                    },
                ],
            },
        }
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(overlay))
        args = [
            "fit",
            "--config",
            str(CONFIGS / f"tiny_cpu_{family}.yaml"),
            "--config",
            str(CONFIGS / "fsdp_cpu.yaml"),
        ]
        args += ["--config", str(tmp_path / f"{run}.yaml"), f"--model.pretrained_model_name_or_path={base}"]
        args += [f"--data.train_shards={data}", f"--trainer.default_root_dir={root}", *extra]
        done = subprocess.run(
            [str(BRUSHNET_TRAIN), *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        return root

    full = fit("full")
    grids = sorted(p.relative_to(full / "grids").as_posix() for p in (full / "grids").rglob("*.png"))
    assert grids == ["step-00000002/00.png", "step-00000004/00.png"]
    ckpts = sorted(c for c in (full / "ckpt").glob("*.ckpt") if c.name != "last.ckpt")
    assert len(ckpts) == 2 and all((c / "__1_0.distcp").is_file() for c in ckpts)
    saved = FileSystemReader(str(ckpts[0])).read_metadata().state_dict_metadata
    assert not any(k.startswith("state_dict.transformer.") for k in saved)  # the frozen base stays out
    assert any(k.startswith("state_dict.ema.") for k in saved)  # the EMA (frozen, but trained) is kept
    assert any(k.startswith("optimizer_0.state.brushnet.") and k.endswith("absmax1") for k in saved)

    resumed = fit("resumed", "--ckpt_path", str(ckpts[0]))
    for name in ("brushnet", "brushnet_ema"):
        a = load_dit_branch(full / "export" / "step-00000004" / name).state_dict()
        b = load_dit_branch(resumed / "export" / "step-00000004" / name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    initial = load_dit_branch(full / "export" / "step-00000002" / "brushnet").state_dict()
    assert any(not torch.equal(initial[k], a[k]) for k in a)  # steps 3-4 changed the branch
