"""What every labeller returns, and the shared mask selection (area fraction, score, at most K)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class MaskProposal:
    """One object mask (bool HxW, True = object pixel) with the labeller's quality score in [0, 1]."""

    mask: np.ndarray
    score: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class Labeler(Protocol):
    name: str
    version: str

    def propose(self, image: np.ndarray) -> list[MaskProposal]:
        """Object masks of an RGB uint8 HxWx3 image, at the image's own size."""
        ...


def select_masks(
    proposals: list[MaskProposal],
    *,
    min_area_frac: float,
    max_area_frac: float,
    min_score: float,
    max_masks: int,
) -> list[MaskProposal]:
    """Keep masks with min_area_frac <= area/(H*W) <= max_area_frac and score >= min_score; best score
    first (ties: larger first), at most `max_masks`."""
    kept = []
    for p in proposals:
        frac = p.area / p.mask.size
        if min_area_frac <= frac <= max_area_frac and p.score >= min_score:
            kept.append(p)
    kept.sort(key=lambda p: (-p.score, -p.area))
    return kept[:max_masks]
