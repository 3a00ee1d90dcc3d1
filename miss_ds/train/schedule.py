"""Learning-rate schedules as multipliers of the peak rate: linear warm-up, then cosine, linear or constant.

A resumed run follows its own config's schedule from the checkpoint's step on (the schedule's state holds only the
step count): :func:`schedule_change` says what a changed ``train`` setting does to the remaining part.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

#: The ``train`` settings that shape the rate of every step.
SCHEDULE_KEYS = ("lr", "schedule", "warmup_steps", "max_steps", "min_lr_ratio")


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """``f(step) -> multiplier`` for ``torch.optim.lr_scheduler.LambdaLR`` (step counts optimizer steps)."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay
    return multiplier


def rate(train: dict[str, Any], step: int) -> float:
    """The learning rate the ``train`` section of a run config (a plain dict) gives after ``step`` scheduler steps."""
    return train["lr"] * lr_lambda(train["schedule"], train["warmup_steps"], train["max_steps"],
                                   train["min_lr_ratio"])(step)


def schedule_change(saved: dict[str, Any], ours: dict[str, Any], done: int) -> Optional[str]:
    """What resuming a run whose ``train`` section was ``saved`` with this run's ``ours``, after ``done`` scheduler
    steps, does to the learning rate; None when no schedule setting changed (or the checkpoint records none)."""
    if not all(key in saved for key in SCHEDULE_KEYS):
        return None
    changed = [f"train.{key}: checkpoint {saved[key]!r}, this run {ours[key]!r}" for key in SCHEDULE_KEYS
               if saved[key] != ours[key]]
    if not changed:
        return None
    # The rate of the step after the resume was set by the saved schedule; the schedule sets the next one.
    return (f"the LR schedule changes at the resume ({'; '.join(changed)}): its remaining part follows this run's "
            f"settings, so from step {done + 2} on the rate is {rate(ours, done + 1):.6g} where the checkpoint's "
            f"run would use {rate(saved, done + 1):.6g}")
