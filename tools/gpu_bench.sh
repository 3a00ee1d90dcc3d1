#!/usr/bin/env bash
# Single-GPU kernel checks and benchmarks of docs/performance.md (device kind nvidia-h100-x1), from the repository
# root, DeepSpeed and its missing dependencies as wheels in .whl/ (see tools/scale_x2.sh).
#   bash tools/gpu_bench.sh tests layer7b layer70b model pack  # stages to run, in order; logs in $OUT/logs.tgz
set -uo pipefail
OUT=${OUT:-runs/perf}; LOGS=/tmp/perf-logs; mkdir -p "$OUT" "$LOGS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$LOGS/env.txt"
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" \
  2>&1 | tail -1 | tee -a "$LOGS/env.txt"
for stage in "$@"; do case $stage in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_layers.py 2>&1 | tail -15 | tee "$LOGS/tests.txt" ;;
  layer7b) python3 tools/bench.py layer --tokens 8192 --in-features 4096 --out-features 11008 --r 64 --profile \
      2>&1 | tee "$LOGS/layer7b.txt" ;;
  layer70b) python3 tools/bench.py layer --tokens 8192 --in-features 8192 --out-features 14336 --r 64 \
      2>&1 | tee "$LOGS/layer70b.txt" ;;
  model) python3 tools/bench.py model --layers 8 --out "$LOGS/model.json" 2>&1 | grep -v Warning | tee "$LOGS/model.txt" ;;
  pack) python3 tools/bench.py pack --preset llama7b --attn sdpa,flex_attention --out "$LOGS/pack" --work /tmp/pack-work \
      2>&1 | grep -v Warning | tee "$LOGS/pack.txt" ;;
esac; tar czf "$OUT/logs.tgz" -C "$LOGS" .; done
