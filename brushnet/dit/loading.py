"""Which family a base folder is, and whether a DiT branch fits a base transformer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch

from brushnet.loading import BaseModelError, BranchMismatchError, resolve_pretrained
from brushnet.typecheck import check_config_file

Family = Literal["unet", "sd3", "flux"]

# transformer/config.json `_class_name` -> family; a base with a unet/ folder is the UNet family.
_TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def base_family(name_or_path: str | os.PathLike) -> Family:
    """``"unet"`` (SD 1.5 / 2.x / SDXL), ``"sd3"`` or ``"flux"``, from the base folder's components."""
    folder = resolve_pretrained(name_or_path)
    if (folder / "unet" / "config.json").is_file():
        return "unet"
    config = folder / "transformer" / "config.json"
    if not config.is_file():
        raise BaseModelError(f"base model {folder} has neither unet/config.json nor transformer/config.json")
    name = json.loads(config.read_text()).get("_class_name")
    if name not in _TRANSFORMER_FAMILIES:
        raise BaseModelError(
            f"{config}: transformer class {name!r} is not supported; expected one of {sorted(_TRANSFORMER_FAMILIES)}"
        )
    return _TRANSFORMER_FAMILIES[name]  # type: ignore[return-value]


def _branch_fields(branch) -> tuple[tuple[str, ...], dict[str, str]]:
    """(fields equal in both configs, branch depth field -> base field) for the branch's family."""
    from brushnet.dit.flux_model import FLUX_MATCH_FIELDS, BrushNetFluxModel
    from brushnet.dit.sd3_model import SD3_MATCH_FIELDS, BrushNetSD3Model

    if isinstance(branch, BrushNetSD3Model):
        return SD3_MATCH_FIELDS, {"base_num_layers": "num_layers"}
    if isinstance(branch, BrushNetFluxModel):
        return FLUX_MATCH_FIELDS, {
            "base_num_layers": "num_layers",
            "base_num_single_layers": "num_single_layers",
        }
    raise TypeError(f"not a DiT BrushNet branch: {type(branch).__name__}")


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_branch_matches_transformer(branch, transformer) -> None:
    """Raise :class:`BranchMismatchError` naming both configs and every field that differs."""
    fields, depth = _branch_fields(branch)
    bcfg, tcfg = branch.config, transformer.config
    problems = [
        f"{f}: branch={bcfg.get(f)!r} base={tcfg.get(f)!r}"
        for f in fields
        if _norm(bcfg.get(f)) != _norm(tcfg.get(f))
    ]
    problems += [
        f"{b} (branch) != {t} (base): {bcfg.get(b)!r} vs {tcfg.get(t)!r}"
        for b, t in depth.items()
        if bcfg.get(b) != tcfg.get(t)
    ]
    if problems:
        raise BranchMismatchError(
            f"{type(branch).__name__} ({bcfg.get('_name_or_path') or 'in memory'}) does not fit the base "
            f"{type(transformer).__name__} ({tcfg.get('_name_or_path') or 'in memory'}): "
            + "; ".join(problems)
        )


def load_dit_branch(name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None):
    """A ``BrushNetSD3Model`` or ``BrushNetFluxModel`` from its folder (picked by ``_class_name``)."""
    from brushnet.dit.flux_model import BrushNetFluxModel
    from brushnet.dit.sd3_model import BrushNetSD3Model

    folder = Path(name_or_path).expanduser()
    folder = folder if folder.is_dir() else resolve_pretrained(name_or_path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"BrushNet folder {str(folder)!r} has no config.json")
    name = json.loads(config.read_text()).get("_class_name")
    classes = {c.__name__: c for c in (BrushNetSD3Model, BrushNetFluxModel)}
    if name not in classes:
        raise ValueError(
            f"{config}: _class_name {name!r} is not a DiT branch; expected one of {sorted(classes)}"
        )
    check_config_file(config, classes[name])  # a wrong-typed field: one line naming the file and the field
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    return classes[name].from_pretrained(folder, use_safetensors=True, **kw)
