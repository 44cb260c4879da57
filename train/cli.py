"""``brushnet-train fit --config configs/<name>.yaml`` (also ``python -m train``): LightningCLI.

The DataModule's ``tokenizer`` is linked to the model's ``pretrained_model_name_or_path`` (one base path
in the config), and the resolved config is saved as ``config.yaml`` in every run's log folder.
``--ckpt_path auto`` (what ``slurm/train.sh`` passes) resumes from the newer of the requeue checkpoint
(``<default_root_dir>/hpc_ckpt_<n>.ckpt``) and ``<default_root_dir>/checkpoints/last.ckpt``, else starts fresh.
:class:`train.requeue.SlurmRequeue` is always installed (options under ``requeue:``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from train.checkpointing import resolve_ckpt_path
from train.data import BrushDataModule
from train.module import BrushNetTrainingModule
from train.requeue import SlurmRequeue

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger(__name__)


class BrushNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.pretrained_model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(SlurmRequeue, "requeue")

    def before_fit(self) -> None:
        cfg = self.config_init["fit"]
        asked = cfg.get("ckpt_path")
        cfg["ckpt_path"] = resolve_ckpt_path(asked, self.trainer)  # auto/last: the newest valid checkpoint
        if asked in ("auto", "last"):
            log.info("--ckpt_path %s: %s", asked, cfg["ckpt_path"] or "no checkpoint found, starting fresh")


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
