"""What a Lightning checkpoint of the training module holds of the model: the trained weights only (branch
and EMA, under their module prefixes) and the count of skipped steps; the frozen base is reloaded from its
folder or hub id on resume."""

from __future__ import annotations

from typing import Any

from torch import nn

TRAINED_PREFIXES = ("brushnet.", "ema.")


def keep_trained_weights(checkpoint: dict[str, Any], skipped_steps: int) -> None:
    """Drop everything but the trained weights from ``checkpoint["state_dict"]`` (in place)."""
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k.startswith(TRAINED_PREFIXES)}
    checkpoint["brushnet_train"] = {"skipped_steps": skipped_steps}


def check_trained_weights(checkpoint: dict[str, Any], branch: nn.Module, ema: nn.Module | None) -> int:
    """Raise KeyError unless ``checkpoint`` holds every weight of ``branch`` (and ``ema``); returns the
    skipped-step count it recorded."""
    state = checkpoint.get("state_dict", {})
    expected = {f"brushnet.{k}" for k in branch.state_dict()}
    if ema is not None:
        expected |= {f"ema.{k}" for k in ema.state_dict()}
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(
            f"the checkpoint lacks {len(missing)} trained weights (e.g. {missing[:3]}): was it written by "
            "another model configuration (EMA on/off, another base)?"
        )
    return int(checkpoint.get("brushnet_train", {}).get("skipped_steps", 0))
