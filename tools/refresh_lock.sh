#!/usr/bin/env bash
# Refresh constraints.txt on purpose: resolve the newest releases that setup.py allows in a fresh virtualenv,
# run the whole test suite against them, and only if it passes write them to constraints.txt.
#
#     tools/refresh_lock.sh                 # torch 2.13.0 (the CPU build CI installs)
#     TORCH=2.14.1 tools/refresh_lock.sh    # try another torch
#
# Then review `git diff constraints.txt`, update the versions named in the README and commit both.
# Nothing is written when the suite fails: the failing log stays in $VENV/../refresh-lock.log.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-2.13.0}"
VENV="${VENV:-$(mktemp -d)/venv}"
LOG="$(dirname "$VENV")/refresh-lock.log"
python3 -m venv "$VENV"
echo "resolving the newest dependencies into $VENV (torch==$TORCH) ..."
"$VENV/bin/pip" install -q "torch==$TORCH" -e ".[test,liger]"  # liger: locked too, installed by GPU users
echo "running the test suite against them (log: $LOG) ..."
if ! "$VENV/bin/python" -m pytest -q tests >"$LOG" 2>&1; then
    tail -n 30 "$LOG"
    echo "the suite fails with the refreshed set: constraints.txt is unchanged" >&2
    exit 1
fi
tail -n 1 "$LOG"
{
    echo "# Exact versions the test suite passed with: the README's install and .ci/run install with -c constraints.txt."
    echo "# Regenerate on purpose with tools/refresh_lock.sh (it runs the suite first). Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)."
    "$VENV/bin/pip" freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > constraints.txt
echo "wrote constraints.txt; review it with: git diff constraints.txt"
