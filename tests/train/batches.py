"""Training batches (the DataModule's batch contract) built from real photos, for the module tests."""

from __future__ import annotations

import numpy as np
import torch

from brushnet.conditioning import token_ids
from tests.train.data_builders import photo


def box_keep_mask(size: int, i: int) -> torch.Tensor:
    """1 x H x W keep-mask (1 = keep) with a box hole whose place depends on ``i``."""
    keep = torch.ones(1, size, size)
    top, left = (i * size // 5) % (size // 2), (i * size // 3) % (size // 2)
    keep[:, top : top + size // 2, left : left + size // 2] = 0
    return keep


def make_batch(tokenizer, size: int = 32, n: int = 2, start: int = 0, tokenizer_2=None) -> dict:
    """A batch in the ``train/data.py`` contract: photos, masked photos (hole = -1), keep-masks, token ids."""
    images = np.stack([photo(start + i, size, size) for i in range(n)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    masks = torch.stack([box_keep_mask(size, start + i) for i in range(n)])
    captions = [f"photo {start + i}" for i in range(n)]
    batch = {
        "pixel_values": pixels,
        "conditioning_pixel_values": torch.where(masks > 0, pixels, torch.tensor(-1.0)),
        "masks": masks,
        "input_ids": token_ids(tokenizer, captions),
        "original_size": torch.tensor([[size, size]] * n),
        "crop_top_left": torch.zeros(n, 2, dtype=torch.long),
        "keys": [f"k{start + i}" for i in range(n)],
        "num_bad": torch.tensor(0),
    }
    if tokenizer_2 is not None:
        batch["input_ids_2"] = token_ids(tokenizer_2, captions)
    return batch
