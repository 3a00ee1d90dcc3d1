#!/usr/bin/env bash
# Single-GPU checks and benchmarks of docs/performance.md (device kind nvidia-h200), from the repository root,
# DeepSpeed and its missing dependencies as wheels in .whl/ (see tools/scale_x2.sh), the baseline probe in .probes/.
#   bash tools/gpu_bench.sh tests layer4k layer7b layer70b model modelprof step70b pack  # stages, in order; logs in $OUT/logs.tgz
set -uo pipefail
OUT=${OUT:-runs/perf}; LOGS=/tmp/perf-logs; mkdir -p "$OUT" "$LOGS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$LOGS/env.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
  2>&1 | tail -1 | tee -a "$LOGS/env.txt"
# The 16-layer slice of the Llama-2-70B shape at TP=1 (the floor from the shared probe, see tools/bench.py step).
SLICE="configs/llama-70b-tp2.yaml parallel.tp_size=1 model.config.num_hidden_layers=16"
for stage in "$@"; do case $stage in
  tests) python3 -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_shared_input.py 2>&1 | tail -15 \
      | tee "$LOGS/tests.txt" ;;
  layer7b) python3 tools/bench.py layer --tokens 8192 --in-features 4096 --out-features 11008 --r 64 --profile \
      2>&1 | tee "$LOGS/layer7b.txt" ;;
  layer4k) python3 tools/bench.py layer --tokens 8192 --in-features 4096 --out-features 4096 --r 64 --profile \
      2>&1 | tee "$LOGS/layer4k.txt" ;;
  layer70b) python3 tools/bench.py layer --tokens 8192 --in-features 8192 --out-features 14336 --r 64 \
      2>&1 | tee "$LOGS/layer70b.txt" ;;
  model) python3 tools/bench.py model --layers 8 --out "$LOGS/model.json" 2>&1 | grep -v Warning | tee "$LOGS/model.txt" ;;
  modelprof) python3 tools/bench.py model --layers 8 --variants frozen,miss --profile 2>&1 | grep -v Warning \
      | tee "$LOGS/modelprof.txt" ;;
  step70b) python3 tools/bench.py step --gpus 1 --ref floor --out "$LOGS/step70b" --work /tmp/step-work \
      --variant "floor=probe:.probes/baseline70b.py --mode tpbase --layers 16 --mbs 2" \
      --variant "miss=train:$SLICE" --variant "mini=train:$SLICE miss.mode=mini miss.mini_r=64" \
      --variant "bat=train:$SLICE miss.mode=bat" \
      --variant "peft_zero3=probe:.probes/baseline70b.py --mode zero3 --layers 16 --mbs 2" 2>&1 | grep -v Warning | tee "$LOGS/step70b.txt" ;;
  pack) python3 tools/bench.py pack --preset llama7b --attn sdpa,flex_attention --out "$LOGS/pack" --work /tmp/pack-work \
      2>&1 | grep -v Warning | tee "$LOGS/pack.txt" ;;
  *) echo "unknown stage '$stage' (tests layer4k layer7b layer70b model modelprof step70b pack)" >&2; exit 2 ;;
esac; tar czf "$OUT/logs.tgz" -C "$LOGS" .; done
