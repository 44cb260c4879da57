"""PSNR, MSE and LPIPS on the preserved (not inpainted) region of a generated image.

Two definitions of MSE/PSNR are reported, clearly labelled:

* **standard** (per channel): ``MSE = sum over kept pixels and the 3 channels of (x - y)^2 / (3 * kept pixels)``,
  values in [0, 1]; ``PSNR = 10 log10(1 / MSE)``, ``inf`` for identical regions.
* **official** (``examples/brushnet/evaluate_brushnet.py``, the paper's tables): the 3-channel sum is divided
  by the 1-channel mask count, so ``MSE_official = 3 * MSE`` and ``PSNR_official = PSNR - 10 log10(3)``
  (about 4.77 dB lower); identical regions give ``PSNR_official = 1000`` (the official cap for MSE < 1e-10).

A fully inpainted image has no preserved region: every value is ``nan`` (left out of means, counted apart).
LPIPS follows the official script too: both images are zeroed outside the preserved region, scaled to
[-1, 1] and compared with LPIPS (SqueezeNet by default, like torchmetrics' ``net_type='squeeze'`` there).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OFFICIAL_PSNR_CAP = 1000.0  # official calculate_psnr: `if mse < 1.0e-10: return 1000`

# torchvision's ImageNet backbones, looked for in the torch hub cache unless a path is configured.
LPIPS_BACKBONE_FILES = {
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
}


@dataclass(frozen=True)
class RegionErrors:
    mse: float
    psnr: float
    mse_official: float
    psnr_official: float


def _check_pair(source: np.ndarray, generated: np.ndarray, keep: np.ndarray) -> None:
    if source.shape != generated.shape or source.ndim != 3 or source.shape[2] != 3:
        raise ValueError(f"images must both be HxWx3 of one shape, got {source.shape} and {generated.shape}")
    if keep.shape != source.shape[:2]:
        raise ValueError(f"keep mask must be HxW {source.shape[:2]}, got {keep.shape}")


def preserved_region_errors(source: np.ndarray, generated: np.ndarray, keep: np.ndarray) -> RegionErrors:
    """MSE/PSNR between uint8 HxWx3 images over the pixels where ``keep`` (bool HxW) is True."""
    source, generated, keep = np.asarray(source), np.asarray(generated), np.asarray(keep, dtype=bool)
    _check_pair(source, generated, keep)
    kept = int(keep.sum())
    if kept == 0:
        nan = float("nan")
        return RegionErrors(nan, nan, nan, nan)
    diff = (source.astype(np.float64) - generated.astype(np.float64)) / 255.0
    squared_sum = float((diff**2)[keep].sum())
    mse = squared_sum / (3 * kept)
    mse_official = squared_sum / kept
    psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
    psnr_official = OFFICIAL_PSNR_CAP if mse_official < 1e-10 else 10 * math.log10(1 / mse_official)
    return RegionErrors(mse, psnr, mse_official, psnr_official)


def default_lpips_backbone(net: str) -> Path:
    """Where torchvision would have cached the backbone: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


class LPIPSMetric:
    """LPIPS with the ``lpips`` package's bundled linear heads (v0.1) and a torchvision backbone from a file."""

    def __init__(self, net: str = "squeeze", backbone: str | os.PathLike | None = None, device: str = "cpu"):
        import lpips
        import torch

        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}")
        self.backbone = Path(backbone) if backbone else default_lpips_backbone(net)
        if not self.backbone.is_file():
            raise FileNotFoundError(f"LPIPS {net} backbone weights not found at {str(self.backbone)!r}")
        # pnet_rand: build the backbone without downloading; its weights come from self.backbone below.
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)
        state = torch.load(self.backbone, map_location="cpu", weights_only=True)
        _load_backbone(model.net, state, self.backbone)
        self.model = model.eval().to(device)
        self.device = device

    def __call__(self, source: np.ndarray, generated: np.ndarray, keep: np.ndarray) -> float:
        import torch

        source, generated, keep = np.asarray(source), np.asarray(generated), np.asarray(keep, dtype=bool)
        _check_pair(source, generated, keep)
        if not keep.any():
            return float("nan")
        m = keep[..., None].astype(np.float32)

        def prep(x: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(x.astype(np.float32) / 255.0 * m).permute(2, 0, 1)[None]
            return (t * 2 - 1).to(self.device)

        with torch.no_grad():
            return float(self.model(prep(generated), prep(source)).item())


def _load_backbone(net, state: dict, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' ``slice<k>.<i>.*`` modules (strict)."""
    slice_of = {idx: name for name, block in net.named_children() for idx, _ in block.named_children()}
    mapped = {}
    for key, value in state.items():
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == "features" and parts[1] in slice_of:
            mapped[f"{slice_of[parts[1]]}.{parts[1]}.{parts[2]}"] = value
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{str(path)!r} is not a torchvision backbone matching LPIPS' net: {e}") from e
