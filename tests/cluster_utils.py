"""Helpers for tests on the one-host Slurm cluster of tools/local_cluster.sh and on mpirun.

Typical use (see tests/test_cluster.py)::

    env = start_cluster()                                   # or pytest.skip(cluster_unavailable_reason())
    job = submit_and_wait(TRAIN_SBATCH, ["--set", "x=1"], env=job_env(env, CONFIG="c.yaml"),
                          sbatch_args=small_job_args(tmp_path))
    assert job.state == "COMPLETED", job.log_text()
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "tools" / "local_cluster.sh"
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
MPI_TRAIN = REPO / "launch" / "mpi" / "train.sh"
PROBE = REPO / "tests" / "cluster_probe.py"
SLURM_DIR = Path(os.environ.get("MISS_DS_SLURM_DIR", "/tmp/miss_ds_slurm"))
CLUSTER_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "mpirun")
# Past these a job never changes again (REQUEUED and PENDING after a requeue are not among them).
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}
# Rank variables of the process running the tests (say, a CI job under Slurm or torchrun) must not leak
# into the jobs it starts.
_INHERITED_RANK_VARS = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|LOCAL_SIZE|MASTER_ADDR|"
                                  r"MASTER_PORT|OMPI_.*|PMI_.*|PMIX_.*|SLURM_.*)$")


def cluster_installed() -> bool:
    return all(shutil.which(b) for b in CLUSTER_BINARIES)


def cluster_unavailable_reason() -> str | None:
    """Why the local cluster cannot be had here, or None if start_cluster() may go ahead."""
    if os.geteuid() != 0:
        return "needs root to install and start munge/slurmctld/slurmd (tools/local_cluster.sh)"
    if not cluster_installed() and not shutil.which("apt-get"):
        return "Slurm/OpenMPI are not installed and apt-get is not available to install them"
    return None


def cluster_running(slurm_dir: Path = SLURM_DIR) -> bool:
    return subprocess.run(["bash", str(LOCAL_CLUSTER), "status", str(slurm_dir)],
                          capture_output=True).returncode == 0


def start_cluster(slurm_dir: Path = SLURM_DIR, timeout: float = 600) -> dict[str, str]:
    """Install (if needed) and start the cluster; return os.environ plus its SLURM_CONF.

    Raises RuntimeError with the script's output when it fails.
    """
    proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", str(slurm_dir)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"local_cluster.sh start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**os.environ, "SLURM_CONF": str(slurm_dir / "slurm.conf")}


def clear_queue(env: Mapping[str, str], timeout: float = 120) -> None:
    """Cancel every job of the cluster and wait until the queue is empty.

    The tests need the node to themselves: jobs left by an interrupted earlier run would hold its CPUs and
    keep every new job PENDING.
    """
    def queued() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%i"], env=env, check=True, capture_output=True,
                              text=True).stdout.split()

    leftover = queued()
    if leftover:
        subprocess.run(["scancel", *leftover], env=env, check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while left := queued():
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs {left} still queued {timeout} s after scancel:\n{queue_report(env)}")
        time.sleep(0.2)


def queue_report(env: Mapping[str, str]) -> str:
    """The queue with each job's reason and the node's state, for error messages."""
    def show(*cmd: str) -> str:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return (proc.stdout + proc.stderr).strip()

    return show("squeue", "-o", "%i %T %r %M") + "\n" + show("sinfo", "-N", "-o", "%N %T %C %E")


def stop_cluster(slurm_dir: Path = SLURM_DIR) -> None:
    subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(slurm_dir)], check=True, capture_output=True)


def job_env(base: Mapping[str, str], **extra: str) -> dict[str, str]:
    """Environment for a job or an mpirun: ``base`` without inherited rank variables (SLURM_CONF kept),
    CPU DeepSpeed, this interpreter for the launch scripts, plus ``extra``."""
    env = {k: v for k, v in base.items() if k == "SLURM_CONF" or not _INHERITED_RANK_VARS.match(k)}
    env.update(DS_ACCELERATOR="cpu", MISS_DS_PYTHON=sys.executable, **extra)
    return env


def small_job_args(log_dir: Path, tasks: int = 2, minutes: int = 30) -> list[str]:
    """sbatch flags that fit train.sbatch to the local node: ``tasks`` tasks and fake GPUs, logs in log_dir.

    Keep ``minutes`` well above train.sbatch's USR1 lead time (5 min): with less, the warning comes at once.
    """
    return [f"--ntasks-per-node={tasks}", f"--gpus-per-node={tasks}", f"--time={minutes}",
            f"--output={log_dir}/slurm-%j.out", f"--chdir={REPO}"]


@dataclass
class Job:
    """A job's state as `scontrol show job` reports it."""

    job_id: int
    state: str
    restarts: int
    exit_code: str
    stdout: Path | None

    def log_text(self) -> str:
        """The job's output file, for assertion messages."""
        if self.stdout is None or not self.stdout.exists():
            return f"(no log for job {self.job_id})"
        return self.stdout.read_text(errors="replace")[-5000:]


def job_info(job_id: int, env: Mapping[str, str]) -> Job:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=env, check=True,
                         capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    return Job(job_id, fields["JobState"], int(fields.get("Restarts", 0)), fields.get("ExitCode", ""),
               Path(fields["StdOut"]) if fields.get("StdOut") else None)


def submit(script: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
           sbatch_args: Sequence[str] = ()) -> int:
    """sbatch ``script`` with ``args`` for it; return the job id."""
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().split(";")[0])


def wait_for_job(job_id: int, env: Mapping[str, str], timeout: float = 180) -> Job:
    """Poll until the job reaches a terminal state; raise TimeoutError if it does not in time."""
    deadline = time.monotonic() + timeout
    while True:
        job = job_info(job_id, env)
        if job.state in TERMINAL_STATES:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s\n{queue_report(env)}\n"
                               f"{job.log_text()}")
        time.sleep(0.5)


def submit_and_wait(script: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                    timeout: float = 180, sbatch_args: Sequence[str] = ()) -> Job:
    """sbatch and wait for the end (through any requeues); the job is cancelled if the wait fails."""
    env = dict(os.environ if env is None else env)
    job_id = submit(script, args, env, sbatch_args)
    try:
        return wait_for_job(job_id, env, timeout)
    except BaseException:
        cancel(job_id, env)
        raise


def cancel(job_id: int, env: Mapping[str, str]) -> None:
    subprocess.run(["scancel", str(job_id)], env=env, capture_output=True)


def signal_batch_shell(job_id: int, sig: signal.Signals, env: Mapping[str, str]) -> None:
    """Signal only the batch script, as `#SBATCH --signal=B:<sig>@T` does at T seconds before the limit."""
    subprocess.run(["scancel", "--batch", f"--signal={sig.name.removeprefix('SIG')}", str(job_id)], env=env,
                   check=True, capture_output=True)


def wait_for_files(paths: Iterable[Path], timeout: float = 120) -> None:
    """Wait until every path exists; raise TimeoutError naming the missing ones."""
    paths = list(paths)
    deadline = time.monotonic() + timeout
    while missing := [p for p in paths if not p.exists()]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"still missing after {timeout} s: {missing}")
        time.sleep(0.2)


def mpirun(np: int, command: Sequence[str], env: Mapping[str, str], timeout: float = 180
           ) -> subprocess.CompletedProcess[str]:
    """``mpirun -np N --allow-run-as-root --oversubscribe COMMAND`` from the repository root."""
    return subprocess.run(["mpirun", "-np", str(np), "--allow-run-as-root", "--oversubscribe", *command],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
