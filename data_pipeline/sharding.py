"""Split work units (parts, shards) across processes and Slurm array tasks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class TaskSlice:
    """This process handles units `i` with `i % num_shards == shard_index`."""

    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"invalid task slice: shard_index={self.shard_index} num_shards={self.num_shards} "
                "(expected 0 <= shard_index < num_shards)"
            )

    def owns(self, unit_index: int) -> bool:
        return unit_index % self.num_shards == self.shard_index

    def select(self, units: Sequence[T]) -> list[T]:
        return [u for i, u in enumerate(units) if self.owns(i)]


WHOLE_JOB = TaskSlice()


def resolve_task_slice(shard_index: int | None = None, num_shards: int | None = None) -> TaskSlice:
    """Explicit `--shard-index/--num-shards` win; otherwise SLURM_ARRAY_TASK_ID/COUNT; otherwise the whole job.

    SLURM_ARRAY_TASK_ID is offset by SLURM_ARRAY_TASK_MIN so `--array=1-8` works like `--array=0-7`.
    """
    if shard_index is not None or num_shards is not None:
        return TaskSlice(shard_index or 0, num_shards or 1)
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return TaskSlice()
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if count is None:
        raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
    task_min = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return TaskSlice(int(task_id) - task_min, int(count))
