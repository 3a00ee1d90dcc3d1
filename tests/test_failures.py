"""A failing or lost rank stops the whole job quickly and says which rank; a preempted job keeps exit code 85.

Each test runs the default config on 2 CPU ranks and waits for signs in the output (a metrics line, a process exit),
never for a fixed time.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launch_utils import ROOT, free_port
from tests.test_train import CONFIG, QUICK, env

#: How long a stopped job may take to notice, and the peer timeout the tests configure.
PEER_TIMEOUT_S = 6


def overrides(out: Path, *extra: str) -> list[str]:
    return [a for o in (*QUICK, f"output_dir={out}", *extra) for a in ("--set", o)]


def wait_for_steps(out: Path, steps: int, procs: list[subprocess.Popen], limit_s: float = 300) -> None:
    """Wait until rank 0 has logged ``steps`` training steps (every process must still be running)."""
    metrics, deadline = out / "metrics.jsonl", time.time() + limit_s
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert all(p.poll() is None for p in procs), "a rank ended before training got going"
        assert time.time() < deadline, "no training step logged"
        time.sleep(0.2)


def test_error_on_one_rank_before_training_stops_every_rank_at_once(tmp_path):
    """Rank 0 finds a bad data row while the other rank waits for the data: both exit non-zero within seconds, and
    the error is printed once."""
    rows = (ROOT / "data/arith/train.jsonl").read_text().splitlines()[:200]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows[:50] + ["{not json"] + rows[50:]) + "\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", "--config", CONFIG, *overrides(tmp_path / "out", f"data.train_path={data}")]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert output.count(f"{data} line 51: not valid JSON") == 1, output[-3000:]
    assert "failed while building the data" in output
    # Each rank exits as soon as the ranks agree that one failed: well under the 30-minute collective timeout.
    assert time.time() - start < 120


def test_killed_rank_is_named_and_the_others_exit(tmp_path):
    """Two ranks started by hand (no launcher to kill the rest): rank 1 is SIGKILLed mid-training; rank 0 names it
    and exits within the configured peer timeout."""
    port, out = free_port(), tmp_path / "out"
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp_path / f"rank{rank}.log", "w")
        rank_env = {**env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "launch/train.py", "--config", CONFIG,
                                       *overrides(out, "train.max_steps=100000", f"parallel.peer_timeout_s={PEER_TIMEOUT_S}",
                                                  "checkpoint.every_steps=0", "eval.every_steps=0")],
                                      cwd=ROOT, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        wait_for_steps(out, 3, procs)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        code = procs[0].wait(timeout=120)
        waited = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    output = (tmp_path / "rank0.log").read_text()
    assert code != 0
    assert "lost rank 1 (" in output, output[-3000:]
    assert waited < PEER_TIMEOUT_S + 30, waited


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_preempted_job_exits_85_under_the_deepspeed_launcher(tmp_path, ctrl_c):
    """SIGTERM to the job (as Slurm sends it): the ranks save and exit 85, and launch/deepspeed.sh returns 85 where
    DeepSpeed's launcher alone returns 1. Ctrl-C reaches the wrapper alone (the job runs in its own session), which
    used to die of it and leave the job running: it now passes it on and returns 85 too."""
    out = tmp_path / "out"
    cmd = ["launch/deepspeed.sh", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", "--config",
           CONFIG, *overrides(out, "train.max_steps=100000", "checkpoint.every_steps=0", "eval.every_steps=0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_steps(out, 3, [proc])
        if ctrl_c:
            proc.send_signal(signal.SIGINT)  # a terminal's Ctrl-C: the foreground group, the wrapper
        else:
            os.killpg(proc.pid, signal.SIGTERM)  # the whole job: wrapper, launcher and ranks
        output, _ = proc.communicate(timeout=120)
    finally:
        for child in psutil.Process().children(recursive=True):
            child.kill()
    assert proc.returncode == 85, output[-3000:]
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved and json.loads((saved[-1] / "manifest.json").read_text())["step"] > 0
