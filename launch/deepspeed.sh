#!/usr/bin/env bash
# `deepspeed` with the preemption exit code kept: same arguments, exits 85 when the ranks saved a checkpoint on
# SIGTERM/SIGUSR1, so a job script can tell "requeue me" from "failed".
#
#     launch/deepspeed.sh --num_gpus 8 launch/train.py --config configs/llama-7b.yaml --resume auto
#
# DeepSpeed's launcher exits 1 whenever it receives SIGTERM itself (it forwards the signal to the ranks, waits up to
# 30 s for them, then exits 1 whatever they returned). The ranks record their exit code in $MISS_DS_EXIT_FILE
# (launch/train.py, rank 0); this script returns it when the launcher's own code says only "signalled".
set -uo pipefail
exit_file="$(mktemp)"
trap 'rm -f "$exit_file"' EXIT
MISS_DS_EXIT_FILE="$exit_file" deepspeed "$@" &
launcher=$!
# Pass SIGTERM/SIGUSR1 on to the launcher as SIGTERM (the one signal it forwards to the ranks; SIGUSR1 would kill it
# and orphan them) and keep waiting for it.
trap 'kill -TERM "$launcher" 2>/dev/null' TERM USR1
code=0
while true; do
    wait "$launcher"
    code=$?
    kill -0 "$launcher" 2>/dev/null || break   # interrupted by a trapped signal: the launcher is still running
done
recorded="$(cat "$exit_file" 2>/dev/null)"
if [ "$recorded" = 85 ]; then
    exit 85
fi
exit "$code"
