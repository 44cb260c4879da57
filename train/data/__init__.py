"""The data side of the trainer: shard tables, a resumable sampler, datasets, transforms, the DataModule."""

from train.data.module import BrushDataModule

__all__ = ["BrushDataModule"]
