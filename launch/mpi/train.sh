#!/usr/bin/env bash
# MiSS fine-tuning under Open MPI's mpirun: one rank per GPU, on this host or on the hosts of a hostfile.
#
#   CONFIG=configs/my.yaml NP=8 launch/mpi/train.sh [--set key=value ...]
#   CONFIG=configs/my.yaml NP=16 HOSTFILE=hosts launch/mpi/train.sh      # hosts: see launch/hostfile.example
#
# Knobs: CONFIG (required); NP (default: the GPUs of this host, else 1); HOSTFILE; MPIRUN_ARGS (extra mpirun
# flags, e.g. "--oversubscribe"); MISS_DS_PYTHON, MISS_DS_VENV, MISS_DS_ENTRY as in launch/slurm/train.sbatch.
# Ranks meet through miss_ds.distributed (rank 0 broadcasts its address); export MASTER_ADDR/MASTER_PORT to
# pin them. Other hosts need the same repository and venv paths (shared file system) and ssh from this one.
set -euo pipefail

: "${CONFIG:?set CONFIG to the training config, e.g. CONFIG=configs/my.yaml launch/mpi/train.sh}"
# Paths given relative to where the script is called from stay valid after the cd to the repository root.
CONFIG=$(realpath -m "$CONFIG")
[[ -n ${HOSTFILE:-} ]] && HOSTFILE=$(realpath "$HOSTFILE")
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
if [[ -z ${MISS_DS_PYTHON:-} ]]; then
  venv=${MISS_DS_VENV:-$root/.venv}
  if [[ -x $venv/bin/python ]]; then MISS_DS_PYTHON=$venv/bin/python; else MISS_DS_PYTHON=python3; fi
fi
# `python launch/train.py` puts launch/ first on sys.path, not the repository: make miss_ds importable anyway.
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
if [[ -z ${NP:-} ]]; then
  NP=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  ((NP > 0)) || NP=1
fi

# Open MPI binds each rank to one core by default, which starves torch's CPU threads and data loaders.
args=(-np "$NP" --wdir "$root" --map-by slot --bind-to none)
[[ -n ${HOSTFILE:-} ]] && args+=(--hostfile "$HOSTFILE")
((EUID == 0)) && args+=(--allow-run-as-root)
# Local ranks inherit the whole environment; ranks on other hosts get only what -x names.
while read -r name; do
  args+=(-x "$name")
done < <(compgen -e | grep -E '^(PATH|LD_LIBRARY_PATH|PYTHONPATH|VIRTUAL_ENV|OMP_NUM_THREADS|MASTER_ADDR|MASTER_PORT|(NCCL|CUDA|TORCH|GLOO|DS|HF|MISS_DS)_.*)$' || true)
read -r -a extra <<<"${MPIRUN_ARGS:-}"

# exec: mpirun gets the signals itself and forwards SIGUSR1/SIGUSR2 to every rank; its exit status is the
# trainer's (85 after a checkpoint on preemption).
exec mpirun "${args[@]}" "${extra[@]}" "$MISS_DS_PYTHON" "${MISS_DS_ENTRY:-launch/train.py}" \
  --config "$CONFIG" --resume auto "$@"
