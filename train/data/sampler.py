"""Seeded, resumable distributed sampler for the indexed BrushData loader.

Every epoch draws one global permutation from ``(seed, epoch)``. Training step ``s`` consumes the contiguous
slice ``perm[s*G:(s+1)*G]`` of it (``G = batch_size * num_replicas``), rank ``r`` taking ``B`` consecutive
entries of that slice. So the samples consumed by all ranks together are always a *prefix* of the epoch's
permutation: a resume only needs ``(epoch, consumed_samples)``, and it stays valid when the number of ranks or
the batch size changes. The tail of the permutation that does not fill a whole global batch is dropped, so
every rank gets exactly the same number of batches (no DDP hang on uneven shards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import NamedTuple

import numpy as np
from torch.utils.data.distributed import DistributedSampler


class SampleRef(NamedTuple):
    """What the sampler hands to the dataset: the epoch travels with the index so the per-sample random
    augmentations can be seeded by ``(seed, epoch, index)`` inside any worker."""

    epoch: int
    index: int


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of one epoch (identical on every rank and worker)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class ResumableDistributedSampler(DistributedSampler):
    """Yields :class:`SampleRef` for one rank; see the module docstring for the layout.

    It subclasses :class:`DistributedSampler` only so that Lightning recognises it as already distributed
    and does not wrap it in its own sampler; the parent's ``num_replicas``/``rank``/``seed``/``epoch``
    attributes keep their meaning.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.global_batch_size = batch_size * num_replicas
        self.dataset_size = len(dataset)
        self.steps_per_epoch = self.dataset_size // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.dataset_size} samples cannot fill one global batch of {batch_size} x {num_replicas} ranks"
            )
        # Used by DistributedSampler-aware code: samples per rank and per epoch.
        self.num_samples = self.steps_per_epoch * batch_size
        self.total_size = self.steps_per_epoch * self.global_batch_size
        self._resume_epoch: int | None = None
        self._resume_offset = 0

    def __len__(self) -> int:
        """The full per-rank epoch length, also in a resumed epoch (Lightning counts batches from it)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._resume_epoch:
            self._resume_epoch, self._resume_offset = None, 0
        self.epoch = epoch

    def resume(self, epoch: int, consumed_samples: int) -> None:
        """Continue ``epoch`` after its first ``consumed_samples`` global samples (all ranks together)."""
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.epoch = epoch
        self._resume_epoch, self._resume_offset = epoch, consumed_samples

    @property
    def start_offset(self) -> int:
        """Global samples of the current epoch already consumed before this iteration starts."""
        return self._resume_offset if self._resume_epoch == self.epoch else 0

    def remaining_steps(self) -> int:
        return max(0, (self.total_size - self.start_offset) // self.global_batch_size)

    def __iter__(self) -> Iterator[SampleRef]:
        epoch, start = self.epoch, self.start_offset
        perm = epoch_permutation(self.dataset_size, self.seed, epoch, self.shuffle)
        B, G = self.batch_size, self.global_batch_size
        for step in range(self.remaining_steps()):
            first = start + step * G + self.rank * B
            for index in perm[first : first + B]:
                yield SampleRef(epoch, int(index))
