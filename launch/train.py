"""Fine-tune a causal LM with MiSS under DeepSpeed: ``miss-ds-train`` (miss_ds/cli/train.py) as a script, for
launchers that take a file.

    deepspeed launch/train.py --config configs/tiny-cpu.yaml [--set train.lr=1e-4 ...] [--resume auto]
    python launch/train.py --config configs/tiny-cpu.yaml            # one process
    srun / mpirun ... python launch/train.py --config ...            # ranks from Slurm or MPI

Exit codes: 0 done; 85 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue and resume); 2 bad input
(config, data, output directory), refused before heavy work; 1 any other failure.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miss_ds.cli.train import run  # noqa: E402 (imports no torch: main() installs the preemption handler first)

if __name__ == "__main__":
    run()
