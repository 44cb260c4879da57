"""BrushNet model library: the branch, its injection into a stock diffusers UNet, masks, pipelines.

Nothing here imports Lightning; the trainer (``train``) and the data pipeline (``data_pipeline``) build on
this package. Public names are imported lazily so ``import brushnet`` stays cheap.
"""

from importlib import import_module
from typing import Any

__all__ = [
    "BrushNetFluxInpaintPipeline",
    "BrushNetFluxModel",
    "BrushNetInpaintPipeline",
    "BrushNetModel",
    "BrushNetOutput",
    "BrushNetSD3InpaintPipeline",
    "BrushNetSD3Model",
    "brushnet_residuals",
    "unet_forward_with_brushnet",
]

_WHERE = {
    "BrushNetModel": "brushnet.model",
    "BrushNetOutput": "brushnet.model",
    "unet_forward_with_brushnet": "brushnet.injection",
    "brushnet_residuals": "brushnet.injection",
    "BrushNetInpaintPipeline": "brushnet.pipeline",
    "BrushNetSD3Model": "brushnet.dit.sd3_model",
    "BrushNetFluxModel": "brushnet.dit.flux_model",
    "BrushNetSD3InpaintPipeline": "brushnet.dit.pipeline_sd3",
    "BrushNetFluxInpaintPipeline": "brushnet.dit.pipeline_flux",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'brushnet' has no attribute {name!r}")
