"""The trainer's own progress, saved with every checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    """Optimizer steps done, tokens trained on (summed over data-parallel ranks), and global batches skipped: the
    windows of micro-batches whose loss or gradients were not finite, dropped whole without an optimizer step."""

    step: int = 0
    tokens_seen: int = 0
    skipped_batches: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_batches = state["skipped_batches"]
