"""Start multi-rank CPU jobs with the deepspeed launcher and read back their RESULT line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from miss_ds.distributed import free_port  # noqa: F401 (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]


def deepspeed_run(script: str, args: list[str], ranks: int, timeout: int = 600, env: dict | None = None
                  ) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus ranks script args`` on CPU (gloo), from the repository root."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), script, *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    """The JSON after 'RESULT ' printed by rank 0; fails with the job's output tail when there is none."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"no RESULT line (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
