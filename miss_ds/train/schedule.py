"""Learning-rate schedules as multipliers of the peak rate: linear warm-up, then cosine, linear or constant."""
from __future__ import annotations

import math
from typing import Callable


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
