#!/usr/bin/env python3
"""Submit launch/slurm/train.sbatch with its #SBATCH values taken from a training config.

    launch/slurm/submit.py --config configs/my.yaml [--nodes 2] [--dry-run] [-- --set train.lr=1e-4 ...]

The config's optional ``cluster:`` section (``run_config.ClusterConfig``: ``nodes``, ``gpus_per_node``, ``time``,
``partition``, ``account``) gives the job's size and limits; a flag given here (``--nodes``, ``--gpus-per-node``, ...)
wins over it, as does a trainer ``--set cluster.KEY=...``, and what none gives keeps the script's #SBATCH default.
Arguments after ``--`` go to the trainer. The config, with the trainer's ``--set`` overrides and these flags, is
checked here first (``miss_ds.run_config.load_config``), so that a typo is refused now (one ``error:`` line, exit 2)
and not after the job waited in the queue. Prints the job id (or, with --dry-run, the command).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
sys.path.insert(0, str(ROOT))
from miss_ds.run_config import ClusterConfig, ConfigError, RunConfig, load_config  # noqa: E402

#: ``cluster:`` key -> its sbatch flag (``_`` as ``-``); tasks per node always follow gpus_per_node (one process
#: per GPU).
CLUSTER_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(ClusterConfig)}


def build_command(config: Path, cluster: ClusterConfig, job_name: str | None, extra_sbatch: list[str],
                  train_args: list[str]) -> list[str]:
    """The sbatch command line for ``cluster`` (the config's section, this command's flags already over it)."""
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={ROOT}/logs/%x-%j.out",
           f"--job-name={job_name or config.stem}"]
    for key, flag in CLUSTER_FLAGS.items():
        value = getattr(cluster, key)
        if value is not None:
            cmd.append(f"{flag}={value}")
            if key == "gpus_per_node":
                cmd.append(f"--ntasks-per-node={value}")
    return cmd + extra_sbatch + [str(SBATCH_SCRIPT)] + train_args


def read_config(config: Path, train_args: list[str]) -> RunConfig:
    """``config`` read as the trainer will, with the ``--set`` overrides in ``train_args`` (ConfigError if the
    trainer would refuse it). The files it names are not checked: the compute nodes may see other paths than this
    login node."""
    sets = [value for flag, value in zip(train_args, train_args[1:]) if flag == "--set"]
    sets += [arg.partition("=")[2] for arg in train_args if arg.startswith("--set=")]
    return load_config(config, sets, check_files=False)


def run_sbatch(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """sbatch's exit code and stdout (--parsable: "id" or "id;cluster"). Its errors go straight to our stderr; a
    failure adds one line saying so, not a traceback."""
    try:
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        print("error: sbatch is not installed here: submit from a Slurm login node, or see the command with --dry-run",
              file=sys.stderr)
        return 127, ""
    if done.returncode != 0:
        print(f"error: sbatch failed with exit code {done.returncode} (its message is above); nothing was submitted",
              file=sys.stderr)
    return done.returncode, done.stdout


def main(argv: list[str]) -> int:
    # Everything after "--" belongs to the trainer, so argparse never mistakes it for ours.
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    hints = typing.get_type_hints(ClusterConfig)
    for key, flag in CLUSTER_FLAGS.items():
        parser.add_argument(flag, dest=key, type=int if hints[key] == Optional[int] else str,
                            help=f"overrides the config's cluster.{key}")
    parser.add_argument("--job-name", help="default: the config file's name")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch flag (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of submitting")
    args = parser.parse_args(argv)

    config = args.config.resolve()
    flags = [f"cluster.{key}={json.dumps(value)}" for key in CLUSTER_FLAGS if (value := getattr(args, key)) is not None]
    try:  # this command's flags are read as --set overrides of the cluster section, and checked as such
        cluster = read_config(config, [*train_args, *(a for flag in flags for a in ("--set", flag))]).cluster
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd = build_command(config, cluster, args.job_name, args.sbatch_arg, train_args)
    # train.sbatch reads the config path from the environment; sbatch exports the environment by default.
    env = {**os.environ, "CONFIG": str(config)}
    if args.dry_run:
        print(f"CONFIG={shlex.quote(str(config))} {shlex.join(cmd)}")
        return 0
    (ROOT / "logs").mkdir(exist_ok=True)  # Slurm does not create the output file's folder
    code, out = run_sbatch(cmd, env)
    if code != 0:
        return code
    job_id = out.strip().split(";")[0]
    print(job_id)
    print(f"log: {ROOT}/logs/{args.job_name or config.stem}-{job_id}.out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
