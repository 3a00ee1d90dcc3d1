"""Preemption notice: SIGTERM / SIGUSR1 are recorded, not fatal, so the trainer saves at the next step boundary.
Ctrl-C (SIGINT) is one too, once: a second one stops the process at once, saving nothing.

Installed first thing in ``launch/train.py``: a notice that arrives while the model is still loading must not
kill the process (SIGUSR1's default action is to terminate).
"""
from __future__ import annotations

import signal
import sys
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Remembers the last preemption signal received; ``requested`` says whether one came."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def install(self) -> "Preemption":
        for sig in SIGNALS:
            signal.signal(sig, self._record)
        signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _record(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def _interrupt(self, signum: int, frame: Any) -> None:
        """The first Ctrl-C asks for a checkpoint and a stop, as a preemption notice does; the next one is Python's
        own KeyboardInterrupt (the handler is given back, so a third one needs no handler to work)."""
        if self.signal == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._record(signum, frame)
        print("Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at once, "
              "saving nothing)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        """The signal received, by name (``SIGTERM``), for messages."""
        return signal.Signals(self.signal).name if self.signal is not None else "none"
