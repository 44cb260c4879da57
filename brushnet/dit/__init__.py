"""BrushNet branches for DiT bases: SD3 / SD3.5 (``BrushNetSD3Model``) and Flux.1 (``BrushNetFluxModel``).

Each family is one branch model, one injection into the stock diffusers transformer, text conditioning and
a pipeline; see the README section "DiT bases".
"""

from brushnet.dit.flux_model import BrushNetFluxModel, BrushNetFluxOutput
from brushnet.dit.injection import (
    flux_forward_with_brushnet,
    sd3_brushnet_residuals,
    sd3_forward_with_brushnet,
)
from brushnet.dit.loading import base_family, check_branch_matches_transformer, load_dit_branch
from brushnet.dit.sd3_model import BrushNetSD3Model, BrushNetSD3Output

__all__ = [
    "BrushNetFluxModel",
    "BrushNetFluxOutput",
    "BrushNetSD3Model",
    "BrushNetSD3Output",
    "base_family",
    "check_branch_matches_transformer",
    "flux_forward_with_brushnet",
    "load_dit_branch",
    "sd3_brushnet_residuals",
    "sd3_forward_with_brushnet",
]
