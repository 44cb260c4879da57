"""``brushnet-train fit --config configs/<name>.yaml`` (also ``python -m train``): LightningCLI.

The DataModule's ``tokenizer`` is linked to the model's ``pretrained_model_name_or_path`` (one base path
in the config), and the resolved config is saved as ``config.yaml`` in every run's log folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from train.data import BrushDataModule
from train.module import BrushNetTrainingModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class BrushNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.pretrained_model_name_or_path", "data.tokenizer")


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
