"""Rank and world-size discovery for every way a job is started, and process-group setup.

One process per GPU is started by one of:

* the ``deepspeed`` launcher or ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set;
* ``mpirun``: OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK/PMI_SIZE (MPICH, Intel MPI); the master address is
  broadcast from rank 0 with mpi4py;
* ``srun`` inside a Slurm job: SLURM_PROCID and friends; the master is the first host of the step's nodelist
  and the port is derived from the job id, so every rank agrees without talking and concurrent jobs differ;
* nothing: one process.

:func:`discover` only reads an environment mapping, so it can be tested with plain dicts.
:func:`init_distributed` completes what only MPI can tell, exports the torch variables and starts DeepSpeed's
process group. Neither imports deepspeed at module import time.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, NoReturn, Optional, TypeVar

from .run_config import ConfigError

T = TypeVar("T")

#: Exit code of a trainer that saved a checkpoint on SIGTERM/SIGUSR1: the job script requeues on it.
PREEMPTED_EXIT_CODE = 85
#: torch's usual rendezvous port, used when nothing else says which port to take.
DEFAULT_MASTER_PORT = 29500
#: Slurm jobs take MASTER_PORT = base + job id % span: below Linux's ephemeral range (32768+).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands in the job. ``launcher`` is one of torch, mpi, slurm, single."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous and DeepSpeed read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "LOCAL_SIZE": str(self.local_world_size),  # the deepspeed launcher's name, read by its CPU accelerator
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


@dataclass(frozen=True)
class ParallelLayout:
    """Where a rank sits in DeepSpeed's TP x DP mesh: TP groups are ranks ``[k*tp, (k+1)*tp)``, so TP peers are
    neighbours (one node) and the data-parallel rank is ``rank // tp``."""

    rank: int
    world: int
    tp: int

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"parallel.tp_size={self.tp} must be at least 1")
        if self.world % self.tp:
            sizes = [n for n in range(1, self.world + 1) if self.world % n == 0]
            raise ConfigError(f"parallel.tp_size={self.tp} does not divide the {self.world} ranks of this job: set "
                              f"parallel.tp_size to one of {sizes}, or start a multiple of {self.tp} ranks (e.g. "
                              f"deepspeed --num_gpus {self.tp} launch/train.py ...)")

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read rank, world size and rendezvous address from ``env`` (default: ``os.environ``).

    Precedence matters: a torchrun/deepspeed child inside a Slurm job carries SLURM_* too, and an mpirun rank
    inside a Slurm job carries the SLURM_PROCID of the step that started Open MPI's daemon, so the explicit torch
    variables win, then MPI's, then Slurm's. For MPI ``master_addr`` is empty unless MASTER_ADDR is set:
    :func:`init_distributed` fills it by broadcast.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch(env)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return _from_mpi(env)
    # SLURM_STEP_ID tells an srun task from the batch script itself, which also has SLURM_PROCID=0 and
    # SLURM_NTASKS=N but is a single process.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _from_slurm(env)
    return RankInfo(0, 1, 0, 1, env.get("MASTER_ADDR", LOOPBACK),
                    int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "single")


def _from_torch(env: Mapping[str, str]) -> RankInfo:
    world_size = int(env["WORLD_SIZE"])
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world_size)))
    return RankInfo(int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)), local_world_size,
                    env.get("MASTER_ADDR", LOOPBACK), int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "torch")


def _from_mpi(env: Mapping[str, str]) -> RankInfo:
    if "OMPI_COMM_WORLD_RANK" in env:  # Open MPI
        rank, size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        local_rank = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))
        local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1))
    else:  # MPICH / Intel MPI (Hydra)
        rank, size = int(env["PMI_RANK"]), int(env["PMI_SIZE"])
        local_rank = int(env.get("MPI_LOCALRANKID", 0))
        local_size = int(env.get("MPI_LOCALNRANKS", 1))
    return RankInfo(rank, size, local_rank, local_size, env.get("MASTER_ADDR", ""),
                    int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "mpi")


def _from_slurm(env: Mapping[str, str]) -> RankInfo:
    # The step's own counts first: a step may use fewer tasks or nodes than the job.
    world_size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", 1))))
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE",
                                                            env.get("SLURM_NTASKS_PER_NODE", "")))
    node_id = int(env.get("SLURM_NODEID", 0))
    local_world_size = tasks_on_node(per_node, node_id) if per_node else world_size
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        master_addr = expand_nodelist(nodelist)[0] if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR", LOOPBACK)
    port = env.get("MASTER_PORT")
    master_port = int(port) if port else slurm_master_port(int(env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", 0))))
    return RankInfo(int(env["SLURM_PROCID"]), world_size, int(env.get("SLURM_LOCALID", 0)), local_world_size,
                    master_addr, master_port, "slurm")


def slurm_master_port(job_id: int) -> int:
    """Rendezvous port of a Slurm job: the same on every rank, different for jobs sharing a node."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's compressed form, e.g. ``"4(x2),2"`` -> 4, 4, 2."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"bad Slurm tasks-per-node value: {tasks_per_node!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts[min(node_id, len(counts) - 1)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist like ``"node[01-03,07],login1"`` as ``scontrol show hostnames`` does."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand_host(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_host(pattern: str) -> list[str]:
    """Expand the first bracket group, then the rest (``rack[1-2]-n[1-2]`` gives four names)."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    names = []
    for rng in m[1].split(","):
        lo, _, hi = rng.partition("-")
        width = len(lo)  # node[01-03]: zero padding follows the lower bound
        for n in range(int(lo), int(hi or lo) + 1):
            names += [f"{head}{n:0{width}d}{rest}" for rest in _expand_host(tail)]
    return names


_initialized: RankInfo | None = None


def init_distributed(timeout_s: int = 1800) -> RankInfo:
    """Discover ranks, export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, pin the device and start DeepSpeed's comms.

    The backend is the accelerator's default (nccl on CUDA, gloo or ccl on CPU). A second call returns the
    first call's answer: by then the exported variables alone would read as a torchrun launch.
    """
    global _initialized
    if _initialized is not None:
        return _initialized
    info = discover()
    if info.launcher == "mpi":
        info = _complete_from_mpi(info)
    elif info.launcher == "single" and "MASTER_PORT" not in os.environ:
        # Two single-process runs on one machine must not both take port 29500.
        info = replace(info, master_port=free_port())
    os.environ.update(info.torch_env())

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # Before the process group exists, so that NCCL binds this rank's GPU and not GPU 0. The modulo covers
    # tasks that see only their own GPU (srun --gpus-per-task=1).
    accelerator = get_accelerator()
    accelerator.set_device(info.local_rank % max(accelerator.device_count(), 1))
    if accelerator.device_name() == "cpu" and info.world_size == 1:
        from .ds_compat import skip_cpu_shm_op

        skip_cpu_shm_op()
    elif accelerator.device_name() == "cpu" and info.rank == 0:  # a silent minute otherwise, on the first run
        logging.getLogger(__name__).info(
            "starting DeepSpeed's CPU backend: the first multi-rank CPU run on a machine builds its shared-memory "
            "all-reduce op (a C++ build of up to a minute, cached for later runs)")
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s),
                               rank=info.rank, world_size=info.world_size)
    if accelerator.device_name() == "cpu":
        _unlink_shm_buffer(info)
    _initialized = info
    return info


def _unlink_shm_buffer(info: RankInfo) -> None:
    """Remove the name of this rank's /dev/shm segment of DeepSpeed's CPU all-reduce.

    DeepSpeed maps a 69 MB segment per rank and never unlinks it, so every CPU run, finished or killed, kept that
    much RAM until reboot. Once every rank has mapped every segment (DeepSpeed's init does; the barrier waits for
    all ranks to be past it) the names can go: the memory then lives exactly as long as the processes.
    """
    import torch.distributed as dist

    from .ds_compat import cpu_shm_segment

    dist.barrier()
    cpu_shm_segment(info.master_addr, info.master_port, info.rank).unlink(missing_ok=True)


def any_rank(flag: Any, device: Any) -> bool:
    """Whether ``flag`` (a bool, or a one-element tensor) holds on any rank: one all-reduce on ``device`` and one host
    sync, so that the ranks take the same decision about something only some of them saw (a non-finite value, a
    preemption signal)."""
    import torch
    import torch.distributed as dist

    value = torch.as_tensor(flag, dtype=torch.float32).reshape(1).to(device)
    dist.all_reduce(value)
    return value.item() > 0


class PeerFailed(RuntimeError):
    """Another rank failed; it printed its own error, this rank only stops."""


def agree(what: str, work: Callable[[], T]) -> T:
    """Run ``work`` on this rank, then learn whether it failed on any rank (one all-reduce that every rank reaches,
    failed or not). A rank whose ``work`` raised re-raises its error, with the list of failed ranks as its
    ``failed_ranks`` (so that the same error is reported once, by the first of them); the others raise
    ``PeerFailed``, and the first of them logs which ranks failed while doing ``what``. So a failure on one rank stops every rank at once instead of
    leaving the others in their next collective until the process group's timeout."""
    import torch
    import torch.distributed as dist

    error: Optional[BaseException] = None
    result: Optional[T] = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        error = exc
        error.failed_ranks = [dist.get_rank() if dist.is_initialized() else 0]  # type: ignore[attr-defined]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from deepspeed.accelerator import get_accelerator

        failed = torch.zeros(dist.get_world_size(), device=get_accelerator().current_device_name())
        failed[dist.get_rank()] = float(error is not None)
        dist.all_reduce(failed)
        ranks = [r for r, flag in enumerate(failed.tolist()) if flag]
        if error is not None:
            error.failed_ranks = ranks  # type: ignore[attr-defined]
        elif ranks:
            if dist.get_rank() == min(set(range(dist.get_world_size())) - set(ranks)):
                logging.getLogger(__name__).error("rank%s %s failed while %s (the error is in %s log); stopping",
                                                  "s" if len(ranks) > 1 else "", ", ".join(map(str, ranks)), what,
                                                  "their" if len(ranks) > 1 else "its")
            raise PeerFailed(f"rank(s) {ranks} failed while {what}")
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def exit_process(code: int) -> NoReturn:
    """End a worker with ``code``: flush, tear the process group down, leave by ``os._exit``.

    A normal interpreter exit runs C++ static destructors while gloo's and the rendezvous store's threads may still
    be alive; std::terminate then aborts a rank whose work is done ("terminate called without an active
    exception", rc -6), and the job reads as failed. Nothing is left to run at that point: files are closed, logs
    and output flushed here. After success (code 0 or the preemption code) every rank waits for the others first;
    after a failure it leaves at once, since the others may never arrive.
    """
    import torch.distributed as dist

    finished = code in (0, PREEMPTED_EXIT_CODE)
    if finished and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if finished and "mpi4py.MPI" in sys.modules:  # mpirun counts a rank that skips MPI_Finalize as failed
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _complete_from_mpi(info: RankInfo) -> RankInfo:
    """Fill the local rank/size and, unless MASTER_ADDR/PORT were exported, the rendezvous from rank 0."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (info.rank, info.world_size):
        raise RuntimeError(f"MPI says rank {comm.Get_rank()}/{comm.Get_size()}, environment says "
                           f"{info.rank}/{info.world_size}")
    # Ranks sharing memory are the ranks of this node, whatever MPI's environment variables are called.
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    info = replace(info, local_rank=node.Get_rank(), local_world_size=node.Get_size())
    node.Free()
    if info.master_addr and "MASTER_PORT" in os.environ:
        return info
    rendezvous = None
    if comm.Get_rank() == 0:
        # One node: stay on loopback. Several: the other nodes need an address of this one.
        single_node = info.local_world_size == info.world_size
        addr = info.master_addr or (LOOPBACK if single_node else _host_address())
        port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else free_port()
        rendezvous = (addr, port)
    addr, port = comm.bcast(rendezvous, root=0)
    return replace(info, master_addr=addr, master_port=port)


def _host_address() -> str:
    """An address other nodes can reach: the hostname's, unless it resolves to loopback (Debian's 127.0.1.1)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    try:
        return subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return socket.gethostname()


def free_port() -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
