#!/usr/bin/env bash
# `deepspeed` with the preemption exit code kept: same arguments, exits 85 when the ranks saved a checkpoint on
# SIGTERM/SIGUSR1 (or Ctrl-C), so a job script can tell "requeue me" from "failed".
#
#     launch/deepspeed.sh --num_gpus 8 launch/train.py --config configs/llama-7b.yaml --resume auto
#
# DeepSpeed's runner dies at once when signalled and its launcher exits 1 (after up to 30 s for the ranks), whatever
# the ranks returned. So deepspeed runs here in its own session, a signal to this script reaches all its processes
# as SIGTERM, and the script waits for every one of them to end; the ranks record their exit code in
# $MISS_DS_EXIT_FILE (launch/train.py, rank 0), which is returned when it says 85.
set -uo pipefail
exit_file="$(mktemp)"
trap 'rm -f "$exit_file"' EXIT
MISS_DS_EXIT_FILE="$exit_file" setsid deepspeed "$@" &
job=$!
trap 'kill -TERM -- "-$job" 2>/dev/null' TERM USR1 INT   # Ctrl-C too: the ranks, in their own session, save
wait "$job"
code=$?
while kill -0 -- "-$job" 2>/dev/null; do   # the runner can end before its launcher and ranks
    sleep 1
done
if [ "$(cat "$exit_file" 2>/dev/null)" = 85 ]; then
    exit 85
fi
exit "$code"
