"""BrushData pipeline: filter LAION-style metadata -> img2dataset download -> mask labelling -> index/validate."""

from __future__ import annotations

import os

# img2dataset imports albumentations, which otherwise phones home for a version check at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
