"""``BrushDataModule``: BrushData shards -> training batches, with exact resume of the data position.

Batch contract (consumed by ``train/module.py``)::

    pixel_values               uint8 Bx3xHxW, 0..255 (a channels-last view)
    masks                      uint8 Bx1xHxW, 1 = keep, 0 = inpaint
    input_ids                  int64 BxL (tokenizer); input_ids_2 int64 BxL (SDXL only, tokenizer_2)
                               SD3 / Flux bases: brushnet.dit.text.DiTTokenizers ids (input_ids_3: SD3's T5)
    original_size              int64 Bx2 (h, w of the stored image); crop_top_left int64 Bx2 (in the resized image)
    keys                       list[str] sample keys
    num_bad                    int64 scalar: bad samples skipped to fill this batch (log it as a metric)
    bad_samples                list[(shard, key)] of those bad samples

``train.data.transforms.normalize_batch`` turns the uint8 tensors into float32 ``pixel_values`` in [-1, 1],
``conditioning_pixel_values`` (the masked image, -1.0 in the hole) and float ``masks`` on the device: in
``Trainer.fit`` in this DataModule's ``on_after_batch_transfer`` (so modules and callbacks see float batches),
and for bare loops at the top of the module's loss. 4 bytes per pixel cross from the workers instead of 28.

Exact resume (``mode="indexed"``): the sampler's global order is a pure function of ``(seed, epoch)`` and
the samples consumed by all ranks form a prefix of it (see ``train/sampler.py``), so the data position is
``(epoch, consumed_samples)``. ``state_dict()`` (saved by Lightning in every checkpoint under the
datamodule's name) computes it from batches the training loop has really *consumed*: inside
``Trainer.fit`` from the loop's own batch progress (workers prefetch, and Lightning's fetcher may run ahead
of the training step, so counting sampled indices would over-count), otherwise from the batches the
DataLoader handed to the caller. ``load_state_dict()`` runs before ``train_dataloader()`` on resume, and the new
sampler skips exactly the consumed prefix.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from brushnet.brushdata import BrushDataError
from brushnet.conditioning import load_caption_tokenizers
from train.data.datasets import IndexedBrushDataset, StreamBrushDataset, collate_examples
from train.data.sampler import ResumableDistributedSampler
from train.data.shards import SampleTable, ensure_index, expand_sources, is_local
from train.data.transforms import AugmentConfig, CaptionTokenizers, normalize_batch

log = logging.getLogger(__name__)

STATE_FORMAT = "brushdata-loader"
STATE_VERSION = 1


@dataclass
class BatchTracker:
    """Main-process view of the batches handed out: position in the epoch and bad-sample totals."""

    max_bad_fraction: float
    min_samples: int
    epoch: int = 0
    start_offset: int = 0  # global samples of the epoch consumed before the current iteration
    batches: int = 0  # handed out in the current iteration
    seen: int = 0  # samples attempted (good + bad), all iterations of this process
    bad: int = 0
    last_bad: tuple[str, str] | None = None

    def start(self, epoch: int, start_offset: int) -> None:
        self.epoch, self.start_offset, self.batches = epoch, start_offset, 0

    def on_batch(self, batch: dict) -> None:
        self.batches += 1
        num_bad = int(batch["num_bad"])
        self.seen += len(batch["keys"]) + num_bad
        self.bad += num_bad
        if num_bad:
            self.last_bad = tuple(batch["bad_samples"][-1])
        if self.bad and self.seen >= self.min_samples and self.bad > self.max_bad_fraction * self.seen:
            shard, key = self.last_bad
            raise BrushDataError(
                shard,
                key,
                f"{self.bad} of {self.seen} samples read so far were bad, more than max_bad_fraction="
                f"{self.max_bad_fraction} (last bad sample: {key} in {shard}; see the WARNING log for all)",
            )


class TrackedDataLoader(DataLoader):
    """A DataLoader that reports every batch it hands out to a :class:`BatchTracker`."""

    def __init__(self, *args: Any, tracker: BatchTracker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker = tracker
        self._iterations = 0

    def __iter__(self):
        if isinstance(self.sampler, ResumableDistributedSampler):
            self.tracker.start(self.sampler.epoch, self.sampler.start_offset)
        else:  # stream mode: a new stream seed per pass (the epoch travels inside the pickled dataset)
            self.dataset.set_epoch(self._iterations)
            self.tracker.start(self._iterations, 0)
        self._iterations += 1
        for batch in super().__iter__():
            self.tracker.on_batch(batch)
            yield batch

    # The data position itself lives in BrushDataModule.state_dict (it needs the trainer's count of consumed
    # batches); these two only tell Lightning that this loader resumes mid-epoch.
    def state_dict(self) -> dict[str, Any]:
        return {"position_saved_by": "BrushDataModule"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class BrushDataModule(L.LightningDataModule):
    """BrushData shards (official tar format) as training batches; see the module docstring.

    Args:
        train_shards: shard paths, folders, globs, brace ranges (``shard-{000..009}.tar``), or ``pipe:``
            URLs (stream mode only). With ``index`` it restricts the index to these shards (optional).
        index: index JSON with per-sample byte offsets (``data_pipeline`` writes it). Without it, local shards
            are scanned once and the index is cached next to them (or in ``index_cache_dir``).
        tokenizer: the base model folder or hub id; ``tokenizer/`` (and ``tokenizer_2/`` for SDXL) are loaded.
        mode: ``"indexed"`` (global shuffle, equal ranks, exact resume) or ``"stream"`` (webdataset resampled
            shards + shuffle buffer; equal ranks but not exactly resumable).
        max_bad_fraction: stop with an error naming the last bad shard/key when more than this fraction of
            the samples read were bad (checked once ``bad_check_min_samples`` samples were read).
        epoch_samples: samples per epoch for stream mode when there is no index (e.g. ``pipe:`` sources).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        index: str | None = None,
        tokenizer: str = "",
        resolution: int = 512,
        batch_size: int = 2,
        num_workers: int = 2,
        random_mask_prob: float = 0.0,
        morph_prob: float = 0.3,
        invert_prob: float = 0.5,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        max_bad_fraction: float = 0.01,
        bad_check_min_samples: int = 100,
        mode: Literal["indexed", "stream"] = "indexed",
        shuffle_buffer: int = 1000,
        index_cache_dir: str | None = None,
        epoch_samples: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if train_shards is None and index is None:
            raise ValueError("BrushDataModule needs `train_shards` or `index`")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if mode not in ("indexed", "stream"):
            raise ValueError(f"mode must be 'indexed' or 'stream', got {mode!r}")
        self.save_hyperparameters()
        self.train_shards = train_shards
        self.index = index
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.mode = mode
        self.shuffle_buffer = shuffle_buffer
        self.index_cache_dir = index_cache_dir
        self.epoch_samples = epoch_samples
        self.pin_memory = pin_memory
        self.augment = AugmentConfig(
            resolution=resolution,
            random_mask_prob=random_mask_prob,
            morph_prob=morph_prob,
            invert_prob=invert_prob,
            proportion_empty_prompts=proportion_empty_prompts,
        )
        self.tracker = BatchTracker(max_bad_fraction, bad_check_min_samples)
        self.table: SampleTable | None = None
        self.tokenizers: CaptionTokenizers | None = None
        self.sampler: ResumableDistributedSampler | None = None
        self._loaded_state: dict | None = None  # the checkpoint's state, applied to the next sampler
        self._resumed: tuple[int, int, int] | None = (
            None  # (epoch, consumed samples, consumed batches) at load
        )

    # ------------------------------------------------------------------ setup
    def _shards(self) -> list[str] | None:
        return None if self.train_shards is None else expand_sources(self.train_shards)

    def prepare_data(self) -> None:
        """Scan local shards once (local rank 0 only) when no index was given."""
        shards = self._shards()
        if self.index is None and shards is not None and all(is_local(s) for s in shards):
            ensure_index(shards, self.index_cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizers is None:
            self.tokenizers = load_caption_tokenizers(self.tokenizer)  # UNet or DiT base
        if self.table is not None:
            return
        shards = self._shards()
        if self.index is not None:
            self.table = SampleTable.from_index(self.index, only=shards)
        elif shards is not None and all(is_local(s) for s in shards):
            self.table = SampleTable.from_index(ensure_index(shards, self.index_cache_dir))
        elif self.mode == "indexed":
            raise ValueError(
                "indexed mode needs local shards or an `index`; for pipe:/URL sources use mode='stream' "
                "with `epoch_samples` (or an index for the sample count)"
            )
        if self.table is not None:
            log.info("BrushData: %d samples in %d shards", len(self.table), len(self.table.shard_paths))

    @property
    def num_samples(self) -> int:
        """Samples per epoch (all ranks): the real count from the index, or ``epoch_samples``."""
        if self.epoch_samples is not None:
            return self.epoch_samples
        if self.table is None:
            raise RuntimeError("call setup() first (or give epoch_samples for stream mode)")
        return len(self.table)

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ------------------------------------------------------------ dataloaders
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Inside ``Trainer.fit``: the float inputs, made on the device from the uint8 batch the workers
        sent, before any module or callback sees the batch."""
        return normalize_batch(batch)

    def train_dataloader(self) -> DataLoader:
        return self.train_dataloader_for(*self._rank_world())

    def train_dataloader_for(self, rank: int, world_size: int) -> DataLoader:
        """The training loader of one rank (``train_dataloader`` asks the trainer; tests simulate ranks)."""
        self.setup("fit")
        if self.mode == "stream":
            return self._stream_loader(rank, world_size)
        dataset = IndexedBrushDataset(self.table, self.augment, self.tokenizers, seed=self.seed)
        self.sampler = ResumableDistributedSampler(
            dataset, self.batch_size, num_replicas=world_size, rank=rank, seed=self.seed
        )
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._loaded_state:
            epoch = self._apply_state(self._loaded_state, epoch)
        else:
            self.sampler.set_epoch(epoch)
        return TrackedDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate_examples,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            tracker=self.tracker,
        )

    def _stream_loader(self, rank: int, world_size: int) -> DataLoader:
        urls = self._shards()
        if urls is None:  # index only: stream its shards
            urls = list(self.table.shard_paths)
        if self.epoch_samples is None and self.table is None:
            raise ValueError("stream mode over pipe:/URL sources needs `epoch_samples` or an `index`")
        batches_per_rank = self.num_samples // (self.batch_size * world_size)
        if batches_per_rank == 0:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one batch of {self.batch_size} per rank"
            )
        dataset = StreamBrushDataset(
            urls,
            self.augment,
            self.tokenizers,
            batch_size=self.batch_size,
            batches_per_rank=batches_per_rank,
            rank=rank,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
        )
        return TrackedDataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_examples,
            pin_memory=self.pin_memory,
            tracker=self.tracker,
        )

    # ------------------------------------------------------------------ state
    @property
    def bad_samples(self) -> int:
        """Bad samples skipped so far by this process (all epochs), plus those lost in damaged shards."""
        return self.tracker.bad + (self.table.lost_samples if self.table is not None else 0)

    def _consumed(self) -> tuple[int, int, int]:
        """(epoch, consumed global samples, consumed batches of this rank) of the current position."""
        sampler, trainer = self.sampler, self.trainer
        G = sampler.global_batch_size
        if trainer is not None and trainer.state.fn == "fit":
            epoch = trainer.current_epoch
            if sampler.epoch < epoch:  # the fit loop closed the sampler's epoch (a run ends, max_steps mid-
                return epoch, 0, 0  # epoch): Lightning resumes at the start of ``current_epoch``, so do we
            ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            base_samples, base_batches = 0, 0
            if self._resumed is not None and self._resumed[0] == epoch:
                _, base_samples, base_batches = self._resumed
            return epoch, base_samples + (ready - base_batches) * G, ready
        t = self.tracker
        repositioned = t.epoch != sampler.epoch or t.start_offset != sampler.start_offset
        if repositioned:  # set_epoch/resume since the last iteration began: nothing consumed there yet
            return sampler.epoch, sampler.start_offset, 0
        return t.epoch, t.start_offset + t.batches * G, t.batches

    def state_dict(self) -> dict[str, Any]:
        if self.mode != "indexed":
            return {}  # stream mode is documented as not exactly resumable
        if self.sampler is None:  # saved before the loader existed: keep what was loaded
            return dict(self._loaded_state or {})
        epoch, samples, batches = self._consumed()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": epoch,
            "consumed_samples": samples,
            "consumed_batches": batches,
            "global_batch_size": self.sampler.global_batch_size,
            "num_samples": self.sampler.dataset_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("format") != STATE_FORMAT or state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"not a BrushDataModule state (format/version): {state_dict!r:.200}")
        self._loaded_state = dict(state_dict)
        if self.sampler is not None:
            self._apply_state(self._loaded_state, self.sampler.epoch)

    def _apply_state(self, state: dict, epoch: int) -> int:
        """Position the sampler at the saved place if the saved epoch is the one about to run."""
        sampler = self.sampler
        self._loaded_state = None
        same_data = state["num_samples"] == sampler.dataset_size and state["seed"] == self.seed
        if not same_data:
            warnings.warn(
                f"the data set or seed changed since the checkpoint (samples {state['num_samples']} -> "
                f"{sampler.dataset_size}, seed {state['seed']} -> {self.seed}): the data order restarts at the "
                f"beginning of epoch {epoch}, the resume is not exact",
                stacklevel=2,
            )
            sampler.set_epoch(epoch)
            return epoch
        if self.trainer is None:
            epoch = state["epoch"]
        if state["epoch"] != epoch:
            sampler.set_epoch(epoch)
            return epoch
        if state["global_batch_size"] != sampler.global_batch_size:
            warnings.warn(
                f"global batch size changed since the checkpoint ({state['global_batch_size']} -> "
                f"{sampler.global_batch_size}): continuing after the same {state['consumed_samples']} consumed "
                "samples of the epoch, with the new batch layout",
                stacklevel=2,
            )
        sampler.resume(epoch, state["consumed_samples"])
        self._resumed = (epoch, state["consumed_samples"], state["consumed_batches"])
        log.info("BrushData: resuming epoch %d after %d consumed samples", epoch, state["consumed_samples"])
        return epoch
