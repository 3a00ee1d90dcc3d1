"""Preemption notice: SIGTERM / SIGUSR1 are recorded, not fatal, so the trainer saves at the next step boundary.

Installed first thing in ``launch/train.py``: a notice that arrives while the model is still loading must not
kill the process (SIGUSR1's default action is to terminate).
"""
from __future__ import annotations

import signal
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Remembers the last preemption signal received; ``requested`` says whether one came."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def install(self) -> "Preemption":
        for sig in SIGNALS:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None
