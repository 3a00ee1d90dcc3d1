"""Non-finite losses and gradients: skip what is broken, agreed by every rank, and stop when it keeps happening."""
from __future__ import annotations

import logging
from typing import Any

import torch

from .. import ds_compat
from ..distributed import any_rank
from .state import TrainState

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class NonFiniteGuard:
    """Decides, the same way on every rank, whether a micro-batch's loss and an optimizer step's gradients are finite.

    Non-finite gradients make DeepSpeed's ZeRO and bf16 optimizers skip the optimizer step themselves
    (``skipped_steps`` grows, the LR schedule holds); the plain torch optimizer of ZeRO-0 in fp32 has no such check
    and would write NaN into D, so for it the guard checks the gradients at the accumulation boundary and takes
    DeepSpeed's overflow path. Every skipped window counts towards ``max_bad_in_row`` (``StepRunner`` decides what
    is skipped).
    """

    def __init__(self, engine: Any, device: torch.device, max_bad_in_row: int, state: TrainState) -> None:
        self.engine, self.device, self.max_bad_in_row, self.state = engine, device, max_bad_in_row, state
        self.bad_in_row = 0
        self._grads_unchecked = not ds_compat.checks_overflow(engine.optimizer)

    def all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether every given tensor is finite on every rank (one all-reduce, one host sync)."""
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        return not any_rank(~finite, self.device)

    def step(self) -> bool:
        """``engine.step()``; returns whether this rank's optimizer skipped an update for non-finite gradients."""
        skipped = self.engine.skipped_steps
        if not self._grads_unchecked or not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
        else:
            grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
            if self.all_finite(*grads):
                self.engine.step()
            else:
                ds_compat.step_without_update(self.engine)
        return self.engine.skipped_steps != skipped

    def good(self) -> None:
        self.bad_in_row = 0

    def bad(self, what: str) -> None:
        """Count a skipped window (``what`` was non-finite: "loss" or "gradients"); stop after ``max_bad_in_row`` in
        a row."""
        self.bad_in_row += 1
        self.state.skipped_batches += 1
        step = self.state.step + 1
        logger.warning("step %d: non-finite %s on some rank; optimizer step skipped, its micro-batches dropped (%d in a "
                       "row)", step, what, self.bad_in_row)
        if self.bad_in_row >= self.max_bad_in_row:
            raise TrainingStopped(
                f"{self.bad_in_row} steps in a row had a non-finite loss or gradients (train.max_bad_steps="
                f"{self.max_bad_in_row}; the last: non-finite {what}) at step {step}: lower train.lr, check the data, "
                "or resume from the last checkpoint")
