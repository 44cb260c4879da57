"""``brushnet-train fit --config configs/<name>.yaml`` (also ``python -m train``): LightningCLI.

The DataModule's ``tokenizer`` is linked to the model's ``pretrained_model_name_or_path`` (one base path
in the config), ``--seed_everything`` is the run's one seed (``model.seed`` and ``data.seed`` follow it),
every logger writes under ``trainer.default_root_dir``, and the resolved config is saved as ``config.yaml``
in every run's log folder. The optimizer is chosen with ``--model.optimizer`` only (LightningCLI's own
``--optimizer``/``--lr_scheduler`` groups are off), and ``fit`` is the only subcommand.
``--ckpt_path auto`` (what ``slurm/train.sh`` passes) and ``--ckpt_path last`` resume from the valid checkpoint
with the highest recorded step (:func:`train.checkpointing.resolve_auto_ckpt`), else start fresh.
:class:`train.requeue.SlurmRequeue` is always installed (options under ``requeue:``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from brushnet.console import EXIT_STATUS_HELP, run_console
from train.checkpoint_io import verify_checkpoint
from train.checkpointing import resolve_ckpt_path
from train.data import BrushDataModule
from train.module import BrushNetTrainingModule
from train.nonfinite import NonFiniteLossError
from train.requeue import SlurmRequeue

log = logging.getLogger(__name__)

# Expected training errors on top of brushnet.errors.EXPECTED_ERRORS (command line and config errors,
# a nan_policy='stop' stop): one line on stderr, exit 2.
TRAINING_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError,
    MisconfigurationException,
    NonFiniteLossError,
)

DESCRIPTION = (
    f"Train a BrushNet branch. {EXIT_STATUS_HELP} --seed_everything N is the run's one seed: model.seed, "
    "data.seed and the validation grids' seed follow it."
)


def _run_folder(default_root_dir: str | None) -> str:
    """A logger's ``save_dir``: the run folder (Lightning's default for it is the working directory)."""
    return default_root_dir if default_root_dir is not None else "."


class BrushNetCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` only: the module has no validation/test/predict loop."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # An int, not Lightning's ``bool | int``: a random seed (``true``) would differ on every rerun of the
        # same command, so ``--ckpt_path last`` would resume with another data order.
        parser.add_argument(
            "--seed_everything",
            type=int,
            default=0,
            help="the run's seed: model.seed (noise, timesteps), data.seed (order, masks, augmentation) "
            "and the validation grids' seed (unless set in ValidationGrids) are this value",
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.pretrained_model_name_or_path", "data.tokenizer")
        # The same value works for both: the model seeds a torch generator from (seed, rank, step) and the
        # data numpy generators from (seed, epoch, index), so the streams are unrelated.
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")
        parser.link_arguments(
            "trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_run_folder
        )
        parser.add_lightning_class_args(SlurmRequeue, "requeue")

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str]) -> None:
        """Lightning's, without its warning about ``args`` next to ``sys.argv`` (``main`` reads ``sys.argv``
        itself and passes the arguments on), refusing a logger ``save_dir``: jsonargparse would silently
        replace it with the run folder (the link above)."""
        if any(a.startswith("--trainer.logger") and a.split("=")[0].endswith("save_dir") for a in args):
            parser.error("a logger's save_dir is the run folder: set --trainer.default_root_dir instead")
        self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Verify a ``--ckpt_path FILE`` (a damaged one is one CheckpointError naming it, not an unpickling
        traceback) but take no hyperparameters from it: Lightning (2.5+) would replace the model's config with
        the checkpoint's, so ``--model.learning_rate`` given with a path was silently ignored (not with
        ``auto``/``last``). The config and the command line decide the hyperparameters of every resume."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("auto", "last") and Path(path).exists():
            verify_checkpoint(path)

    def before_fit(self) -> None:
        cfg = self.config_init["fit"]
        asked = cfg.get("ckpt_path")
        cfg["ckpt_path"] = resolve_ckpt_path(asked, self.trainer)  # auto/last: the newest valid checkpoint
        if asked in ("auto", "last"):
            log.info("--ckpt_path %s: %s", asked, cfg["ckpt_path"] or "no checkpoint found, starting fresh")


def build_cli(args: list[str], run: bool = True) -> BrushNetCLI:
    """Parse ``args`` (e.g. ``["fit", "--config", ...]``), build model, data and trainer, and run the
    subcommand unless ``run=False``."""
    return BrushNetCLI(
        BrushNetTrainingModule,
        BrushDataModule,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # a bad option or config value raises (one line from main) instead of printing the whole usage
        parser_kwargs={"description": DESCRIPTION, "exit_on_error": False, "fit": {"exit_on_error": False}},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> int:
    """Entry point of ``brushnet-train``; ``args`` defaults to ``sys.argv[1:]``. Returns the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_console("brushnet-train", _run, args, TRAINING_ERRORS)


def _run(args: list[str]) -> None:
    build_cli(args)
    close_process_group()


def close_process_group() -> None:
    """Close the DDP process group after a finished run. Lightning leaves it open, and at interpreter exit
    gloo's threads then sometimes abort a rank ("terminate called without an active exception", seen once
    in a 2-task Slurm job after its last step), so a successful job could end FAILED."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
