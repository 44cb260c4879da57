"""Loggers: W&B that falls back to offline mode when no API key is configured."""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

log = logging.getLogger(__name__)


def wandb_api_key_configured() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``~/.netrc`` (``wandb login``) has an api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger``; ``offline=None`` (default) means offline exactly when no API key is
    configured (or ``WANDB_MODE=offline``), and the log says so."""

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun") or (
                not wandb_api_key_configured()
            )
            if offline:
                log.warning(
                    "W&B: no API key configured (WANDB_API_KEY or `wandb login`), logging OFFLINE; "
                    "upload later with `wandb sync <save_dir>/wandb/offline-run-*`"
                )
        super().__init__(*args, offline=offline, **kwargs)
