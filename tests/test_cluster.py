"""Rank discovery (unit tests on fake environments) and the launch scripts on a real one-host Slurm and mpirun.

The ``cluster`` tests need root: they install (apt, once) and start tools/local_cluster.sh, and skip with the
reason otherwise. Deselect them with ``-m "not cluster"``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Importable whether or not tests/ is a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster_utils as cu  # noqa: E402
from miss_ds.distributed import (PREEMPTED_EXIT_CODE, RankInfo, discover, expand_nodelist,  # noqa: E402
                                 slurm_master_port, tasks_on_node)

# An srun task's environment as Slurm 22.05 sets it (task 1 of 2 on one node).
SLURM_TASK = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
              "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
              "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "vm",
              "SLURM_JOB_NODELIST": "vm", "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"}


# ---- discover() on fake environments ----------------------------------------------------------------------

def test_single_process():
    assert discover({}) == RankInfo(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n1",
           "MASTER_PORT": "1234"}
    assert discover(env) == RankInfo(5, 8, 1, 4, "n1", 1234, "torch")


def test_deepspeed_launcher_local_size():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "MASTER_ADDR": "n1",
           "MASTER_PORT": "29500"}
    assert discover(env) == RankInfo(3, 4, 1, 2, "n1", 29500, "torch")


def test_torch_variables_win_inside_slurm():
    """torchrun or deepspeed started by a 1-task srun: its children carry SLURM_PROCID=0 too."""
    env = {**SLURM_TASK, "SLURM_PROCID": "0", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
           "MASTER_ADDR": "vm", "MASTER_PORT": "29501"}
    assert discover(env).launcher == "torch" and discover(env).rank == 1


def test_slurm_task():
    info = discover(SLURM_TASK)
    assert info == RankInfo(1, 2, 1, 2, "vm", slurm_master_port(1234), "slurm")


def test_slurm_exported_master_wins():
    info = discover({**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 23456)


def test_slurm_multi_node():
    env = {**SLURM_TASK, "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_STEP_NUM_TASKS": "10", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2",
           "SLURM_STEP_NODELIST": "gpu[07-08,10]"}
    info = discover(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (9, 10, 1, 2)
    assert info.master_addr == "gpu07"


def test_slurm_without_nodelist_uses_launch_node():
    env = {k: v for k, v in SLURM_TASK.items() if "NODELIST" not in k}
    assert discover(env).master_addr == "127.0.0.1"


def test_slurm_port_differs_between_jobs():
    ports = {discover({**SLURM_TASK, "SLURM_JOB_ID": str(j)}).master_port for j in range(100, 110)}
    assert len(ports) == 10 and all(20000 <= p < 30000 for p in ports)


def test_slurm_batch_shell_is_single():
    """The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=2 but is one process (no step id)."""
    env = {k: v for k, v in SLURM_TASK.items() if not k.startswith("SLURM_STEP")}
    assert discover({**env, "SLURM_PROCID": "0"}).launcher == "single"


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert discover(env) == RankInfo(3, 4, 1, 2, "", 29500, "mpi")


def test_mpich_hydra():
    env = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1", "MASTER_ADDR": "h0"}
    assert discover(env) == RankInfo(2, 3, 0, 1, "h0", 29500, "mpi")


def test_mpirun_inside_slurm_is_mpi():
    """Ranks of an mpirun in a batch job inherit SLURM_PROCID of the step that runs Open MPI's daemon."""
    env = {**SLURM_TASK, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    info = discover(env)
    assert (info.launcher, info.rank) == ("mpi", 1)


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a[8-10],login1", ["a8", "a9", "a10", "login1"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("gpu-[001-002]-ib,cpu5", ["gpu-001-ib", "gpu-002-ib", "cpu5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_tasks_on_node():
    assert [tasks_on_node("4(x2),2", n) for n in range(3)] == [4, 4, 2]
    with pytest.raises(ValueError):
        tasks_on_node("4x2", 0)


def test_init_distributed_single_process(tmp_path):
    """A plain process gets a one-rank gloo group on a free port (in a subprocess: it starts DeepSpeed)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(cu.PROBE), "--out", str(out)], env=cu.job_env(os.environ),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "rank0-run0.json").read_text())
    assert (result["launcher"], result["world_size"], result["sum"]) == ("single", 1, 1.0)


def test_submit_dry_run(tmp_path):
    """The sbatch line takes the config's cluster section, the trainer's --set cluster.* over it and submit.py's
    flags over both."""
    config = tmp_path / "c.yaml"
    config.write_text((cu.REPO / "configs/tiny-cpu.yaml").read_text()
                      + "cluster:\n  nodes: 2\n  gpus_per_node: 4\n  time: '01:00:00'\n  account: a1\n")
    proc = subprocess.run([sys.executable, str(cu.REPO / "launch/slurm/submit.py"), "--config", str(config),
                           "--partition", "p1", "--time", "02:00:00", "--dry-run", "--", "--set", "train.lr=0.01",
                           "--set", "cluster.nodes=3", "--set", "cluster.account=a2"],
                          capture_output=True, text=True, check=True, cwd=cu.REPO)
    cmd = proc.stdout.split()
    assert cmd[0] == f"CONFIG={config}" and cmd[1] == "sbatch"
    for flag in ("--nodes=3", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=02:00:00", "--partition=p1",
                 "--account=a2"):
        assert flag in cmd
    assert cmd[-7:] == [str(cu.TRAIN_SBATCH), "--set", "train.lr=0.01", "--set", "cluster.nodes=3", "--set",
                        "cluster.account=a2"]


@pytest.mark.parametrize("edit, train_args, expect", [
    (("", ""), ["--set", "trian.lr=3"], "--set 'trian.lr=3': unknown key 'trian'; did you mean 'train'?"),
    (("", ""), ["--set", "cluster.node=3"], "unknown key 'cluster.node'; did you mean 'cluster.nodes'?"),
    (("logging:", "cluster:\n  time: 24:00:00\nlogging:"), [],
     "'cluster.time' must be str, got 86400 (quote it: YAML read it as a number)"),
    (("logging:\n  every_steps: 5", "logging:\n  every_steps: 0"), [],
     "'logging.every_steps' is 0; it must be at least 1"),
])
def test_submit_refuses_a_config_the_trainer_would_refuse(tmp_path, edit, train_args, expect):
    """A typo must not wait in the queue to fail: submit.py reads the config as the trainer will (its --set
    overrides included) and refuses it in one line, exit 2, before sbatch runs."""
    text = (cu.REPO / "configs/tiny-cpu.yaml").read_text()
    assert edit[0] in text
    config = tmp_path / "c.yaml"
    config.write_text(text.replace(*edit))
    proc = subprocess.run([sys.executable, str(cu.REPO / "launch/slurm/submit.py"), "--config", str(config), "--",
                           *train_args], capture_output=True, text=True, cwd=cu.REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expect in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the launch scripts on a local Slurm and mpirun ---------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_env():
    """os.environ plus SLURM_CONF of a running local cluster; stopped afterwards if this module started it."""
    reason = cu.cluster_unavailable_reason()
    if reason:
        pytest.skip(reason)
    was_running = cu.cluster_running()
    try:
        env = cu.start_cluster()
    except RuntimeError as err:
        if not cu.cluster_installed():
            pytest.skip(f"could not install Slurm/OpenMPI: {err}")
        raise
    cu.clear_queue(env)
    yield env
    if not was_running:
        cu.stop_cluster()


def read_results(out: Path, world_size: int, run: int = 0) -> list[dict]:
    return [json.loads((out / f"rank{r}-run{run}.json").read_text()) for r in range(world_size)]


def assert_allreduce(results: list[dict], launcher: str) -> None:
    """Every rank saw 2 ranks, its own local rank, and 1 + 2 from the all_reduce."""
    assert [(r["rank"], r["world_size"], r["local_rank"], r["sum"], r["launcher"]) for r in results] == \
        [(0, 2, 0, 3.0, launcher), (1, 2, 1, 3.0, launcher)]
    assert len({(r["master_addr"], r["master_port"]) for r in results}) == 1


@pytest.mark.cluster
def test_nodelist_matches_scontrol(cluster_env):
    nodelist = "rack[1-2]-n[08-10],login1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=cluster_env, check=True,
                         capture_output=True, text=True).stdout
    assert expand_nodelist(nodelist) == out.split()


@pytest.mark.cluster
def test_sbatch_two_tasks_allreduce(cluster_env, tmp_path):
    env = cu.job_env(cluster_env, CONFIG="unused.yaml", MISS_DS_ENTRY=str(cu.PROBE))
    job = cu.submit_and_wait(cu.TRAIN_SBATCH, ["--out", str(tmp_path)], env, sbatch_args=cu.small_job_args(tmp_path))
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), job.log_text()
    results = read_results(tmp_path, 2)
    assert_allreduce(results, "slurm")
    assert results[0]["master_port"] == slurm_master_port(job.job_id)


@pytest.mark.cluster
def test_mpirun_two_ranks_allreduce(cluster_env, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is needed for MPI rank discovery")
    proc = cu.mpirun(2, [sys.executable, str(cu.PROBE), "--out", str(tmp_path)], cu.job_env(cluster_env))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_allreduce(read_results(tmp_path, 2), "mpi")


@pytest.mark.cluster
def test_mpi_train_wrapper(cluster_env, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is needed for MPI rank discovery")
    env = cu.job_env(cluster_env, CONFIG="unused.yaml", NP="2", MPIRUN_ARGS="--oversubscribe",
                     MISS_DS_ENTRY=str(cu.PROBE))
    proc = subprocess.run(["bash", str(cu.MPI_TRAIN), "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_allreduce(read_results(tmp_path, 2), "mpi")


@pytest.mark.cluster
def test_sbatch_usr1_checkpoints_and_requeues(cluster_env, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@T sends) reaches both ranks through srun; they exit 85,
    the script requeues, and the second run sees SLURM_RESTART_COUNT=1."""
    env = cu.job_env(cluster_env, CONFIG="unused.yaml", MISS_DS_ENTRY=str(cu.PROBE))
    job_id = cu.submit(cu.TRAIN_SBATCH, ["--out", str(tmp_path), "--mode", "preempt"], env,
                       cu.small_job_args(tmp_path))
    try:
        cu.wait_for_files([tmp_path / f"ready-rank{r}" for r in range(2)], timeout=120)
        cu.signal_batch_shell(job_id, signal.SIGUSR1, env)
        job = cu.wait_for_job(job_id, env, timeout=180)
    finally:
        cu.cancel(job_id, env)
    log = job.log_text()
    assert (job.state, job.restarts) == ("COMPLETED", 1), log
    assert [(tmp_path / f"preempted-rank{r}-run0").read_text() for r in range(2)] == ["SIGUSR1"] * 2
    assert f"exited {PREEMPTED_EXIT_CODE}; requeueing" in log
    assert [r["restart_count"] for r in read_results(tmp_path, 2, run=1)] == [1, 1]


@pytest.mark.cluster
def test_scancel_is_not_requeued(cluster_env, tmp_path):
    """scancel sends SIGTERM everywhere: the tasks still checkpoint and exit 85, but the job stays cancelled
    (`scontrol requeue` would revive a cancelled job)."""
    env = cu.job_env(cluster_env, CONFIG="unused.yaml", MISS_DS_ENTRY=str(cu.PROBE))
    job_id = cu.submit(cu.TRAIN_SBATCH, ["--out", str(tmp_path), "--mode", "preempt"], env,
                       cu.small_job_args(tmp_path))
    try:
        cu.wait_for_files([tmp_path / f"ready-rank{r}" for r in range(2)], timeout=120)
        cu.cancel(job_id, env)
        cu.wait_for_files([tmp_path / f"preempted-rank{r}-run0" for r in range(2)], timeout=60)
        job = cu.wait_for_job(job_id, env, timeout=60)  # past COMPLETING: the batch script has ended
    finally:
        cu.cancel(job_id, env)
    log = job.log_text()
    assert (job.state, job.restarts) == ("CANCELLED", 0), log
    assert "batch: SIGTERM" in log and "requeueing" not in log, log


# ---- the real training job under Slurm and mpirun ------------------------------------------------------------

TRAIN_SETS = ["train.max_steps=40", "eval.every_steps=0", "eval.max_batches=2", "checkpoint.every_steps=0",
              "logging.every_steps=1", "logging.progress=false", "train.warmup_steps=4"]


def trainer_args(out: Path) -> list[str]:
    return [a for s in (*TRAIN_SETS, f"output_dir={out}") for a in ("--set", s)]


def losses_of(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.fixture(scope="module")
def slurm_training(cluster_env, tmp_path_factory) -> dict[int, float]:
    """The tiny default job as a 2-task sbatch job, run to the end: its per-step losses."""
    out = tmp_path_factory.mktemp("slurm-train")
    env = cu.job_env(cluster_env, CONFIG="configs/tiny-cpu.yaml")
    job = cu.submit_and_wait(cu.TRAIN_SBATCH, trainer_args(out), env, timeout=600,
                             sbatch_args=cu.small_job_args(out))
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0"), job.log_text()
    return losses_of(out)


@pytest.mark.cluster
def test_sbatch_trains_the_default_job(slurm_training):
    assert sorted(slurm_training) == list(range(1, 41))
    first = sum(slurm_training[s] for s in (1, 2, 3)) / 3
    last = sum(slurm_training[s] for s in (38, 39, 40)) / 3
    assert last < 0.7 * first, (first, last)


@pytest.mark.cluster
def test_sbatch_preempted_job_requeues_and_resumes_exactly(cluster_env, slurm_training, tmp_path):
    env = cu.job_env(cluster_env, CONFIG="configs/tiny-cpu.yaml")
    job_id = cu.submit(cu.TRAIN_SBATCH, trainer_args(tmp_path), env, cu.small_job_args(tmp_path))
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
            assert time.monotonic() < deadline, "training did not reach step 10"
            time.sleep(0.3)
        cu.signal_batch_shell(job_id, signal.SIGUSR1, env)
        job = cu.wait_for_job(job_id, env, timeout=600)
    finally:
        cu.cancel(job_id, env)
    log = job.log_text()
    assert (job.state, job.restarts) == ("COMPLETED", 1), log
    assert f"exited {PREEMPTED_EXIT_CODE}; requeueing" in log
    losses = losses_of(tmp_path)
    assert sorted(losses) == sorted(slurm_training)
    for step, loss in slurm_training.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step


@pytest.mark.cluster
def test_mpirun_trains_the_default_job_like_slurm(cluster_env, slurm_training, tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is needed for MPI rank discovery")
    env = cu.job_env(cluster_env, CONFIG="configs/tiny-cpu.yaml", NP="2", MPIRUN_ARGS="--oversubscribe")
    proc = subprocess.run(["bash", str(cu.MPI_TRAIN), *trainer_args(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = losses_of(tmp_path)
    assert sorted(losses) == sorted(slurm_training)
    for step, loss in slurm_training.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
