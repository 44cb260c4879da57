"""Mask labellers: segment-anything (with a checkpoint) or the weight-free classical fallback."""

from __future__ import annotations

import logging

from data_pipeline.config import LabelConfig
from data_pipeline.labelers.base import Labeler, MaskProposal, select_masks

log = logging.getLogger(__name__)

__all__ = ["Labeler", "MaskProposal", "make_labeler", "select_masks"]


def make_labeler(cfg: LabelConfig) -> Labeler:
    """`sam` / `classical` explicitly; `auto` = SAM when a checkpoint is configured, else classical (loudly)."""
    kind = cfg.labeler
    if kind == "auto":
        kind = "sam" if cfg.sam.checkpoint else "classical"
        if kind == "classical":
            log.warning(
                "!!! label.labeler=auto and no label.sam.checkpoint configured: using the weight-free CLASSICAL "
                "labeller (scikit-image Felzenszwalb). Set label.sam.checkpoint to a SAM .pth for SAM masks. !!!"
            )
    if kind == "sam":
        from data_pipeline.labelers.sam import SamLabeler

        return SamLabeler(cfg.sam)
    from data_pipeline.labelers.classical import ClassicalLabeler

    return ClassicalLabeler(cfg.classical)
