"""A stand-in for launch/train.py in the cluster tests: same CLI shape, tiny work.

``--mode allreduce``: init_distributed(), all_reduce(rank + 1) over all ranks, write ``rank<R>-run<N>.json``
(N: SLURM_RESTART_COUNT, 0 outside Slurm or before a requeue).
``--mode preempt``: the same, then write ``ready-rank<R>`` and wait; on SIGUSR1/SIGTERM write
``preempted-rank<R>-run<N>`` and exit with PREEMPTED_EXIT_CODE, as the trainer does after its checkpoint.
On a requeued run (SLURM_RESTART_COUNT >= 1) it finishes at once instead of waiting.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Run from anywhere (srun, mpirun): import the package from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from miss_ds.distributed import PREEMPTED_EXIT_CODE, init_distributed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for the per-rank result files")
    parser.add_argument("--mode", choices=["allreduce", "preempt"], default="allreduce")
    parser.add_argument("--wait-s", type=float, default=120, help="preempt mode: give up after this long")
    # Accepted and ignored, so that launch scripts can pass the trainer's arguments unchanged.
    parser.add_argument("--config")
    parser.add_argument("--resume")
    args = parser.parse_args()

    stop: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))

    import torch
    import torch.distributed as dist

    info = init_distributed(timeout_s=120)
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
              "local_world_size": info.local_world_size, "launcher": info.launcher, "sum": total.item(),
              "master_addr": info.master_addr, "master_port": info.master_port, "restart_count": restarts}
    (args.out / f"rank{info.rank}-run{restarts}.json").write_text(json.dumps(result))

    code = 0
    if args.mode == "preempt" and restarts == 0:
        (args.out / f"ready-rank{info.rank}").touch()
        deadline = time.monotonic() + args.wait_s
        while not stop and time.monotonic() < deadline:
            time.sleep(0.1)
        if not stop:
            print(f"rank {info.rank}: no signal within {args.wait_s} s", file=sys.stderr)
            return 1
        dist.barrier()  # like the collective checkpoint save
        (args.out / f"preempted-rank{info.rank}-run{restarts}").write_text(signal.Signals(stop[0]).name)
        code = PREEMPTED_EXIT_CODE
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
