"""Weight-free labeller: scikit-image Felzenszwalb graph segmentation + region filtering.

Used when no SAM checkpoint is available. Regions are segmented on a downscaled copy, small holes are
filled, and each region's score is its solidity (area / convex-hull area): compact, object-like regions
score high, thin background fragments low.
"""

from __future__ import annotations

import numpy as np
import skimage
from skimage.measure import regionprops
from skimage.segmentation import felzenszwalb
from skimage.transform import resize

from data_pipeline import __version__
from data_pipeline.config import ClassicalConfig
from data_pipeline.labelers.base import MaskProposal


class ClassicalLabeler:
    name = "classical-felzenszwalb"

    def __init__(self, cfg: ClassicalConfig | None = None) -> None:
        self.cfg = cfg or ClassicalConfig()
        self.version = f"data_pipeline {__version__}, scikit-image {skimage.__version__}"

    def propose(self, image: np.ndarray) -> list[MaskProposal]:
        h, w = image.shape[:2]
        scale = min(1.0, self.cfg.max_side / max(h, w))
        small = image
        if scale < 1.0:
            shape = (max(1, round(h * scale)), max(1, round(w * scale)))
            small = (resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)).astype(np.uint8)
        min_size = max(1, int(self.cfg.min_size_frac * small.shape[0] * small.shape[1]))
        labels = felzenszwalb(small, scale=self.cfg.scale, sigma=self.cfg.sigma, min_size=min_size)
        proposals = []
        for region in regionprops(labels + 1):
            r0, c0, r1, c1 = region.bbox
            small_mask = np.zeros(labels.shape, dtype=bool)
            small_mask[r0:r1, c0:c1] = region.image_filled  # the region with its holes filled
            mask = small_mask
            if scale < 1.0:  # nearest-neighbour upsampling back to the stored image size
                rows = np.minimum((np.arange(h) * small.shape[0] / h).astype(int), small.shape[0] - 1)
                cols = np.minimum((np.arange(w) * small.shape[1] / w).astype(int), small.shape[1] - 1)
                mask = small_mask[np.ix_(rows, cols)]
            proposals.append(MaskProposal(mask=mask, score=float(region.solidity)))
        return proposals
