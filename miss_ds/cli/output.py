"""What the tools print where: stdout carries a command's output alone (answers, a report, what was written), so
that it can be piped; logs and warnings go to stderr."""
from __future__ import annotations

import contextlib
import sys


def deepspeed_logs_to_stderr() -> None:
    """Send DeepSpeed's log lines (the accelerator it detects, at import) to stderr. DeepSpeed's logger writes to the
    stream that is ``sys.stdout`` when DeepSpeed is first imported, so this must run before anything imports it (the
    commands import nothing of it at module level)."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401
