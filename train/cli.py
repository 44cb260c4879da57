"""``brushnet-train fit --config configs/<name>.yaml`` (also ``python -m train``): LightningCLI.

The DataModule's ``tokenizer`` is linked to the model's ``pretrained_model_name_or_path`` (one base path
in the config), and the resolved config is saved as ``config.yaml`` in every run's log folder.
``--ckpt_path auto`` (what ``slurm/train.sh`` passes) resumes from the newest requeue checkpoint
(``<default_root_dir>/hpc_ckpt_<n>.ckpt``), else ``<default_root_dir>/checkpoints/last.ckpt``, else starts fresh.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from train.data import BrushDataModule
from train.module import BrushNetTrainingModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger(__name__)


def resolve_auto_ckpt(root_dir: str | Path) -> str | None:
    """The checkpoint ``--ckpt_path auto`` resumes from: newest hpc (requeue) checkpoint, else last.ckpt."""
    root = Path(root_dir)
    hpc = sorted(root.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    if hpc:
        return str(hpc[-1])
    last = root / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


class BrushNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.pretrained_model_name_or_path", "data.tokenizer")

    def before_fit(self) -> None:
        cfg = self.config_init["fit"]
        if cfg.get("ckpt_path") == "auto":
            cfg["ckpt_path"] = resolve_auto_ckpt(self.trainer.default_root_dir)
            log.info("--ckpt_path auto: %s", cfg["ckpt_path"] or "no checkpoint found, starting fresh")


def main(args: list[str] | None = None, run: bool = True) -> BrushNetCLI:
    """Entry point of ``brushnet-train``; ``args`` defaults to ``sys.argv[1:]``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return BrushNetCLI(
        BrushNetTrainingModule,
        BrushDataModule,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args if args is not None else sys.argv[1:],
        run=run,
    )


if __name__ == "__main__":
    main()
