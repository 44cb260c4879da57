"""The two BrushData datasets behind :class:`train.data.BrushDataModule` and their collate function.

* :class:`IndexedBrushDataset` (map-style, exact): seeks each sample inside its tar through the byte offsets
  of a :class:`~train.data.shards.SampleTable`; combined with :class:`~train.data.sampler.ResumableDistributedSampler`
  it gives a global shuffle, equal ranks and an exact resume.
* :class:`StreamBrushDataset` (iterable, not exact): webdataset's resampled shards + a shuffle buffer, for
  ``pipe:``/URL sources without random access.

A bad sample (truncated tar, undecodable image, RLE out of bounds, size fields that disagree with the
image, missing member, non-UTF-8 caption) is skipped with a WARNING naming shard and key; the indexed
dataset replaces it by the next index (deterministic), and every example reports how many bad samples were
skipped to produce it (``num_bad``), so the counts reach the main process inside the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from brushnet.brushdata import decode_sample
from train.data.sampler import SampleRef
from train.data.shards import MEMBERS, SampleTable
from train.data.transforms import AugmentConfig, CaptionTokenizers, make_example

log = logging.getLogger(__name__)

# What a bad sample raises: BrushDataError/MaskError are ValueErrors, as is UnicodeDecodeError; OSError for
# unreadable files; cv2.error from OpenCV on corrupt data. Programming errors (TypeError, ...) propagate.
BAD_SAMPLE_ERRORS = (ValueError, OSError, EOFError, cv2.error)
# After this many consecutive bad samples the data is broken beyond skipping.
MAX_CONSECUTIVE_BAD = 1000


class _BadSampleLog:
    """WARNING once per (shard, key) and process; repeats (next epochs) go to DEBUG."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, shard: str, key: str, error: BaseException) -> None:
        level = logging.DEBUG if (shard, key) in self._seen else logging.WARNING
        self._seen.add((shard, key))
        log.log(level, "skipping bad BrushData sample %s in %s: %s", key, shard, error)


class IndexedBrushDataset(Dataset):
    def __init__(
        self, table: SampleTable, cfg: AugmentConfig, tokenizers: CaptionTokenizers, seed: int = 0
    ) -> None:
        self.table = table
        self.cfg = cfg
        self.tokenizers = tokenizers
        self.seed = seed
        self._fds: dict[str, int] = {}
        self._log_bad = _BadSampleLog()

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, ref: SampleRef | int) -> dict:
        epoch, index = ref if isinstance(ref, tuple) else (0, int(ref))
        bad: list[tuple[str, str]] = []
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self.table))):
            i = (index + attempt) % len(self.table)
            shard, key = self.table.shard(i), self.table.key(i)
            # Seeded by the *requested* index: a replacement sample gets its own augmentation, not that of
            # the index it is borrowed from.
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                members = self.table.read_members(i, self._fds)
                example = make_example(
                    decode_sample(members, key=key, shard=shard, min_size=self.cfg.resolution),
                    rng,
                    self.cfg,
                    self.tokenizers,
                )
            except BAD_SAMPLE_ERRORS as e:
                self._log_bad(shard, key, e)
                bad.append((shard, key))
                continue
            example["num_bad"] = len(bad)
            example["bad_samples"] = bad
            return example
        raise RuntimeError(
            f"{len(bad)} consecutive bad BrushData samples from index {index} on (last: {bad[-1][1]} in "
            f"{bad[-1][0]}): the data set is broken"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}  # file descriptors do not travel to spawned workers
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)


class StreamBrushDataset(IterableDataset):
    """Resampled webdataset stream yielding exactly ``batches_per_rank * batch_size`` examples per epoch and
    rank, spread over the DataLoader workers so that every rank gets the same number of full batches."""

    def __init__(
        self,
        urls: list[str],
        cfg: AugmentConfig,
        tokenizers: CaptionTokenizers,
        *,
        batch_size: int,
        batches_per_rank: int,
        rank: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        self.urls = urls
        self.cfg = cfg
        self.tokenizers = tokenizers
        self.batch_size = batch_size
        self.batches_per_rank = batches_per_rank
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self._log_bad = _BadSampleLog()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # whole batches per worker, so the DataLoader (which batches inside each worker) yields full batches
        batches = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        wanted = batches * self.batch_size
        if wanted == 0:
            return
        stream_seed = [self.seed, self.epoch, self.rank, worker]
        seed_int = int(np.random.SeedSequence(stream_seed).generate_state(1)[0])
        pending_errors: list[tuple[str, str]] = []

        def on_error(exn: BaseException) -> bool:  # webdataset handler: count, log, continue
            pending_errors.append(("?", f"<unreadable tar data: {exn}>"))
            log.warning("skipping unreadable BrushData stream data: %s", exn)
            return True

        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                self.urls,
                seed=seed_int,
                worker_seed=lambda: 0,
                deterministic=True,
            ),
            wds.tarfile_to_samples(handler=on_error),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed_int + 1),
        )
        rng = np.random.default_rng(stream_seed)
        produced = 0
        for raw in pipeline:
            key, shard = str(raw.get("__key__", "?")), str(raw.get("__url__", "?"))
            members = {m: raw[m] for m in MEMBERS if m in raw}
            try:
                example = make_example(
                    decode_sample(members, key=key, shard=shard, min_size=self.cfg.resolution),
                    rng,
                    self.cfg,
                    self.tokenizers,
                )
            except BAD_SAMPLE_ERRORS as e:
                self._log_bad(shard, key, e)
                pending_errors.append((shard, key))
                continue
            example["num_bad"] = len(pending_errors)
            example["bad_samples"] = list(pending_errors)
            pending_errors.clear()
            yield example
            produced += 1
            if produced == wanted:
                return


def collate_examples(examples: list[dict]) -> dict:
    """Stack examples into the loader's batch (see ``train/data/module.py``): uint8 images and keep-masks,
    4-7x fewer bytes between processes than float32; ``pixel_values`` is a channels-last view (the copy to
    NCHW happens in :func:`~train.data.transforms.normalize_batch`, on the device)."""
    images = torch.from_numpy(np.stack([e["image"] for e in examples]))
    keep = torch.from_numpy(np.stack([e["keep"] for e in examples]).view(np.uint8))
    batch = {
        "pixel_values": images.permute(0, 3, 1, 2),
        "masks": keep[:, None],
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "original_size": torch.tensor([e["original_size"] for e in examples], dtype=torch.int64),
        "crop_top_left": torch.tensor([e["crop_top_left"] for e in examples], dtype=torch.int64),
    }
    if "input_ids_2" in examples[0]:
        batch["input_ids_2"] = torch.stack([e["input_ids_2"] for e in examples])
    batch["keys"] = [e["key"] for e in examples]
    batch["num_bad"] = torch.tensor(sum(e["num_bad"] for e in examples), dtype=torch.int64)
    batch["bad_samples"] = [b for e in examples for b in e["bad_samples"]]
    return batch
