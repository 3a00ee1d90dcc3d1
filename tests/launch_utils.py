"""Start jobs from the tests: multi-rank CPU jobs with the deepspeed launcher (and their RESULT line), and the
default job on a GPU."""
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


def train_default_job_on_gpu(out: Path, *sets: str) -> dict:
    """The README's default job (configs/tiny-cpu.yaml) through launch/train.py on the GPU, with ``--set`` overrides
    ``sets``: its eval losses, first logged train loss, summary and output."""
    sets = ("logging.progress=false", "eval.samples=0", f"output_dir={out}", *sets)
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny-cpu.yaml",
                           *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "DS_ACCELERATOR": "cuda", "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"eval": [r["loss"] for r in rows if r["split"] == "eval"],
            "first_train": next(r["loss"] for r in rows if r["split"] == "train"),
            "summary": json.loads((out / "summary.json").read_text()), "output": proc.stdout + proc.stderr}
