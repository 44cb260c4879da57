"""What training does with a NaN/Inf loss or gradient: :class:`NonFiniteSteps`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

NanPolicy = Literal["skip", "stop"]


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradients) became NaN/Inf and ``nan_policy="stop"``."""


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) tensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


class NonFiniteSteps:
    """The non-finite-step policy of one training run.

    * The unit is the optimizer step: a non-finite loss in any micro-batch of an accumulation window, or a
      non-finite gradient after the window's backward passes, drops the whole update. The gradients are
      cleared, so the optimizer leaves the branch unchanged, and the EMA and the LR schedule do not
      advance (:attr:`update_skipped`).
    * Under DDP/FSDP the verdict is all-reduced: every rank skips that update, or none does. Every
      micro-batch still runs its backward, so every rank reaches each gradient all-reduce.
    * ``"skip"`` logs a warning and goes on; more than ``max_consecutive_skips`` dropped updates in a row
      raise :class:`NonFiniteLossError`. ``"stop"`` raises at the first one, before anything is written.
    * Under ``16-mixed`` the GradScaler finds inf/NaN gradients itself (an overflow is not an error there):
      only a non-finite loss counts, and a step the scaler skipped also leaves the EMA and LR alone.
    * :attr:`skipped_steps` (dropped updates, scaler skips excluded) is saved in checkpoints.

    The LightningModule calls :meth:`start_micro_batch` and :meth:`record_loss` in ``training_step``,
    :meth:`check_update` in ``on_before_optimizer_step`` and :meth:`finish_update` after the optimizer step.
    """

    def __init__(self, policy: NanPolicy = "skip", max_consecutive_skips: int = 20) -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"nan_policy must be 'skip' or 'stop', got {policy!r}")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.update_skipped = False
        self._window_open = False
        self._losses: list[tuple[torch.Tensor, str]] = []  # the open window's losses, where each was computed

    def start_micro_batch(self) -> None:
        """Opens a window at the first micro-batch of an optimizer step."""
        if not self._window_open:
            self._window_open = True
            self.update_skipped = False
            self._losses = []

    def record_loss(self, loss: torch.Tensor, where: str) -> None:
        """Keeps the micro-batch's loss for :meth:`check_update`; no host sync here (reading ``isfinite`` now
        would stall the device queue once per micro-batch)."""
        self._losses.append((loss.detach(), where))

    def _first_bad_loss(self) -> str | None:
        for loss, where in self._losses:
            if not bool(torch.isfinite(loss)):
                return f"loss is {loss.item()} {where}"
        return None

    def check_update(
        self,
        params: Iterable[torch.nn.Parameter],
        step: int,
        *,
        check_gradients: bool,
        reduce: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        """Drop the update (clear the gradients of ``params``) when this rank or another one saw a non-finite
        loss or gradient. ``check_gradients``: False under ``16-mixed``. ``reduce``: the strategy's
        ``reduce(tensor, reduce_op="sum")`` under DDP/FSDP (one scalar all-reduce), None on one process.
        The verdict is one device-to-host read for the window's losses, all gradients and all ranks."""
        params = list(params)
        if not params:
            return
        device = _local_tensor(params[0]).device
        checks = [torch.isfinite(loss).all().to(device) for loss, _ in self._losses]
        grads = [_local_tensor(p.grad) for p in params if p.grad is not None] if check_gradients else []
        if grads:  # a NaN/Inf element makes its tensor's norm NaN/Inf
            checks.append(torch.stack(torch._foreach_norm(grads)).isfinite().all())
        bad = (~torch.stack(checks).all()).float() if checks else torch.zeros((), device=device)
        if reduce is not None:
            bad = reduce(bad, reduce_op="sum")
        if not float(bad.sum()):
            self.consecutive_skips = 0
            return
        reason = self._first_bad_loss()  # the rare path: more reads to say what was non-finite
        if reason is None and grads and not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()):
            reason = f"a gradient is NaN/Inf at step {step}"
        reason = reason or f"a non-finite loss or gradient on another rank at step {step}"
        for p in params:
            p.grad = None  # the optimizer leaves parameters without a gradient unchanged
        self._skip(reason)

    def finish_update(self, scaler_skipped: bool = False) -> None:
        """Closes the window after the optimizer step; ``scaler_skipped``: the GradScaler skipped it."""
        self.update_skipped = self.update_skipped or scaler_skipped
        self._window_open = False

    def _skip(self, what: str) -> None:
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"{what}; stopping (nan_policy='stop'). No checkpoint was written from the non-finite state."
            )
        self.update_skipped = True
        self.consecutive_skips += 1
        self.skipped_steps += 1
        log.warning("%s: skipping this optimizer step (%d in a row)", what, self.consecutive_skips)
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self.consecutive_skips} consecutive non-finite steps (last: {what}), more than "
                f"max_consecutive_skips={self.max_consecutive_skips}: stopping"
            )
