"""Fine-tune a causal LM with MiSS under DeepSpeed.

    miss-ds-train --config configs/tiny-cpu.yaml [--set train.lr=1e-4 ...] [--resume auto]   # one process
    deepspeed launch/train.py --config configs/tiny-cpu.yaml                                  # several ranks
    srun / mpirun ... python launch/train.py --config ...                                     # ranks from Slurm or MPI

Exit codes: 0 done; 85 stopped by SIGTERM/SIGUSR1 or one Ctrl-C after saving a checkpoint (requeue and resume, with
--resume auto; a second Ctrl-C stops at once); 2 bad input
(config, data, output directory), refused before heavy work; 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import NoReturn

from ..train.preemption import Preemption  # imports no torch (miss_ds and miss_ds.train import nothing eagerly)


def main(argv: list[str] | None = None) -> int:
    preemption = Preemption().install()  # before anything slow: a notice while loading must not kill us
    from ..run_config import load_config
    from .errors import input_errors, report_input_error

    parser = argparse.ArgumentParser(prog="miss-ds-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set train.max_steps=50 (repeatable)")
    parser.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint) or a checkpoint path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds a run (the old run is moved aside, not deleted)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = parser.parse_args(argv)
    from ..distributed import discover

    rank = discover().rank  # deepspeed/torchrun, mpirun or srun: rank 0 alone logs at INFO
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.set)
        # Said once a run starts (not for --help or bad input), though installed above.
        print("preemption handler installed: SIGTERM/SIGUSR1 or Ctrl-C save a checkpoint and exit 85",
              file=sys.stderr, flush=True)
        from ..train.trainer import Trainer

        trainer = Trainer(cfg, resume=args.resume, preemption=preemption, overwrite=args.overwrite)
    except input_errors() as exc:  # bad input: one line, printed once (by the first rank that found it)
        return report_input_error(exc)
    try:
        return trainer.train()
    finally:
        trainer.close()


def record_exit_code(code: int) -> None:
    """Write the exit code to $MISS_DS_EXIT_FILE (rank 0), for launch/deepspeed.sh: DeepSpeed's launcher exits 1
    whenever it is signalled itself, even when every rank saved a checkpoint and exited 85."""
    from ..distributed import discover

    path = os.environ.get("MISS_DS_EXIT_FILE")
    if path and discover().rank == 0:
        with open(path, "w") as f:
            f.write(f"{code}\n")


def run() -> NoReturn:
    """The process: ``main``, its exit code recorded, then ``exit_process`` (workers end together, see there).
    Nothing that imports torch is imported before ``main`` has installed the preemption handler."""
    try:
        code = main()
    except SystemExit as exc:  # argparse: --help (0), bad arguments (2)
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except BaseException as exc:  # noqa: BLE001 - printed here, then the process leaves without waiting for the others
        from ..distributed import PeerFailed
        from ..watchdog import name_lost_peer

        if not isinstance(exc, PeerFailed):  # PeerFailed: another rank failed and printed why (rank 0 logged which)
            traceback.print_exc()
            name_lost_peer(exc)
        code = 1
    record_exit_code(code)
    from ..distributed import exit_process

    exit_process(code)


if __name__ == "__main__":
    run()
