"""One optimizer step: a window of ``grad_accum_steps`` micro-batches, the loss a per-token mean over the global batch.

The global batch of a step is every micro-batch of the window on every data-parallel rank. Its loss is the sum of
all token losses divided by the number of loss tokens in it (counted before the first forward: one all-reduce), so
that micro-batch 16 and micro-batch 8 x 2 accumulation steps, or 2 data-parallel ranks, train on the same loss and
gradient. Each micro-batch's loss is the model's own sum over its tokens divided by that count (transformers'
``num_items_in_batch``); DeepSpeed is asked not to divide it by the accumulation steps, and it averages gradients
over the data-parallel ranks, so the loss given to backward is multiplied by their number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..data import count_tokens, loss_tokens
from ..distributed import ParallelLayout, any_rank
from .guard import NonFiniteGuard

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-weighted mean loss of the global batch."""
    tokens: int
    """Real (not padding) tokens of the global batch: every data-parallel rank's, counted once per TP group."""


class StepRunner:
    """Runs optimizer steps of ``accum`` micro-batches drawn from ``next_batch`` (this rank's micro-batches).

    Non-finite values drop the whole window, agreed by every rank: a micro-batch with a non-finite loss (on any rank)
    is backpropagated as NaN, so the window's gradients are non-finite, and an optimizer step with non-finite
    gradients is skipped (``NonFiniteGuard.step``); a new window is then drawn from the next micro-batches. So every
    step that is taken is the token-weighted mean over a whole clean window, and DeepSpeed's accumulation count
    stays in step with the windows. The guard counts the skipped windows and stops the run when they keep coming.
    """

    def __init__(self, engine: Any, next_batch: Callable[[], Batch], layout: ParallelLayout, device: torch.device,
                 accum: int, guard: NonFiniteGuard) -> None:
        self.engine, self.next_batch, self.layout, self.device = engine, next_batch, layout, device
        self.accum, self.guard = accum, guard

    def __call__(self) -> StepResult:
        while True:
            result = self._window()
            if result is not None:
                return result

    def _window(self) -> StepResult | None:
        """One accumulation window; None when its optimizer step was skipped."""
        window = [self._to_device(self.next_batch()) for _ in range(self.accum)]
        num_items = self._global_sum(torch.stack([loss_tokens(b) for b in window]).sum().float()).clamp_min(1)
        losses, tokens, bad_loss = [], torch.zeros((), device=self.device), False
        for i, batch in enumerate(window):
            loss = self.engine(**batch, num_items_in_batch=num_items).loss
            if not self.guard.all_finite(loss):
                bad_loss, loss = True, loss * float("nan")  # makes every gradient of the window non-finite
            self.engine.backward(loss * self.layout.dp, scale_wrt_gas=False)
            skipped = self.guard.step()  # only the window's last micro-batch reaches the accumulation boundary
            if i == len(window) - 1 and any_rank(skipped, self.device):
                self.guard.bad("loss" if bad_loss else "gradients")
                return None
            losses.append(loss.detach().float())
            tokens += count_tokens(batch)
        if bad_loss:
            raise RuntimeError("an optimizer step was taken over non-finite gradients: DeepSpeed did not skip it")
        self.guard.good()
        totals = self._global_sum(torch.stack([torch.stack(losses).sum(), tokens.float()]))
        return StepResult(totals[0].item(), int(totals[1].item()))

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the global batch: over all ranks, counting each TP group (identical batches) once."""
        value = value.to(self.device).clone()
        dist.all_reduce(value)
        return value / self.layout.tp
