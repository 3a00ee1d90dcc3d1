#!/usr/bin/env bash
# Single-GPU checks and benchmarks of docs/performance.md (device kind nvidia-h200), from the repository root,
# DeepSpeed and its missing dependencies as wheels in .whl/ (see tools/scale_x2.sh), the baseline probe in .probes/.
# The GPU image lacks deepspeed, hjson, pydantic, pydantic_core, annotated_types, typing_inspection, datasets, dill,
# multiprocess and liger_kernel (Python 3.12 wheels: pip download --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 --no-deps, the versions of constraints.txt; deepspeed: pip wheel --no-deps).
#   bash tools/gpu_bench.sh tests layer4k layer7b layer70b model modelrounds modelprof step70b pack  # stages, in order; logs in $OUT/logs.tgz
#   bash tools/gpu_bench.sh shapes   # bench.py layer on every projection shape of Llama-7B and Llama-2-70B
#   bash tools/gpu_bench.sh fp8tests fp8layer fp8model fp8step fp8full                   # the FP8 base (docs/scale.md)
#   bash tools/gpu_bench.sh ligertests ligermodel ligermodel7b ligerstep ligerfull   # model.kernels=liger
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
  shapes) for shape in 4096x4096 4096x11008 11008x4096 8192x8192 8192x1024 8192x28672 28672x8192; do
      python3 tools/bench.py layer --tokens 8192 --in-features ${shape%x*} --out-features ${shape#*x} --r 64 \
        2>&1 | tee "$LOGS/layer-$shape.txt"; done ;;
  layer7b) python3 tools/bench.py layer --tokens 8192 --in-features 4096 --out-features 11008 --r 64 --profile \
      2>&1 | tee "$LOGS/layer7b.txt" ;;
  layer4k) python3 tools/bench.py layer --tokens 8192 --in-features 4096 --out-features 4096 --r 64 --profile \
      2>&1 | tee "$LOGS/layer4k.txt" ;;
  layer70b) python3 tools/bench.py layer --tokens 8192 --in-features 8192 --out-features 14336 --r 64 \
      2>&1 | tee "$LOGS/layer70b.txt" ;;
  model) python3 tools/bench.py model --layers 8 --rounds 3 --out "$LOGS/model.json" 2>&1 | grep -v Warning | tee "$LOGS/model.txt" ;;
  modelrounds) python3 tools/bench.py model --layers 8 --variants frozen,miss,mini,bat --rounds 15 --repeat 3 \
      --out "$LOGS/modelrounds.json" 2>&1 | grep -v Warning | tee "$LOGS/modelrounds.txt" ;;
  modelprof) python3 tools/bench.py model --layers 8 --variants frozen,miss --profile 2>&1 | grep -v Warning \
      | tee "$LOGS/modelprof.txt" ;;
  step70b) python3 tools/bench.py step --gpus 1 --ref floor --out "$LOGS/step70b" --work /tmp/step-work \
      --variant "floor=probe:.probes/baseline70b.py --mode tpbase --layers 16 --mbs 2" \
      --variant "miss=train:$SLICE" --variant "mini=train:$SLICE miss.mode=mini miss.mini_r=64" \
      --variant "bat=train:$SLICE miss.mode=bat" \
      --variant "peft_zero3=probe:.probes/baseline70b.py --mode zero3 --layers 16 --mbs 2" 2>&1 | grep -v Warning | tee "$LOGS/step70b.txt" ;;
  fp8tests) python3 -m pytest -q -s -p no:cacheprovider tests/test_fp8_gpu.py > "$LOGS/fp8tests.txt" 2>&1
      grep -E "FP8 |passed|failed|Error" "$LOGS/fp8tests.txt" ;;
  fp8layer) for shape in 8192x28672 28672x8192 8192x8192 8192x1024; do
      python3 tools/bench.py layer --tokens 8192 --in-features ${shape%x*} --out-features ${shape#*x} --r 64 \
        --base-precision fp8 --warmup 3 --repeat 10 2>&1 | tee "$LOGS/fp8layer-$shape.txt"; done ;;
  fp8model) python3 tools/bench.py model --layers 4 --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8 \
      --variants frozen,miss,miss-fp8,miss-fp8-qkv-bf16,mini-fp8 --out "$LOGS/fp8model.json" 2>&1 | grep -v Warning \
      | tee "$LOGS/fp8model.txt" ;;
  fp8step) python3 tools/bench.py step --gpus 1 --ref floor --out "$LOGS/fp8step" --work /tmp/step-work \
      --variant "floor=probe:.probes/baseline70b.py --mode tpbase --layers 16 --mbs 2" \
      --variant "miss=train:$SLICE" --variant "miss_fp8=train:$SLICE model.base_precision=fp8" \
      --variant "miss_auto=train:$SLICE model.recompute_layers=auto" \
      --variant "miss_fp8_auto=train:$SLICE model.base_precision=fp8 model.recompute_layers=auto" 2>&1 \
      | grep -v Warning | tee "$LOGS/fp8step.txt" ;;
  fp8full) python3 tools/bench.py step --gpus 1 --ref fp8_80 --out "$LOGS/fp8full" --work /tmp/step-work \
      --variant "fp8_80=train:configs/llama-70b-tp2.yaml parallel.tp_size=1 model.base_precision=fp8" \
      --variant "fp8_80_auto=train:configs/llama-70b-tp2.yaml parallel.tp_size=1 model.base_precision=fp8 model.recompute_layers=auto" \
      2>&1 | grep -v Warning | tee "$LOGS/fp8full.txt" ;;
  ligertests) python3 -m pytest -q -s -p no:cacheprovider tests/test_fused_kernels_gpu.py tests/test_fp8_gpu.py \
      > "$LOGS/ligertests.txt" 2>&1; grep -E "Liger |FP8 |passed|failed|Error" "$LOGS/ligertests.txt" ;;
  ligermodel) python3 tools/bench.py model --layers 4 --hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8 \
      --variants frozen,miss,miss-fp8,frozen-liger,miss-liger,miss-fp8-liger --out "$LOGS/ligermodel.json" 2>&1 \
      | grep -v Warning | tee "$LOGS/ligermodel.txt" ;;
  ligermodel7b) python3 tools/bench.py model --layers 8 --variants frozen,miss,mini,frozen-liger,miss-liger,mini-liger \
      --out "$LOGS/ligermodel7b.json" 2>&1 | grep -v Warning | tee "$LOGS/ligermodel7b.txt" ;;
  ligerstep) python3 tools/bench.py step --gpus 1 --ref floor --out "$LOGS/ligerstep" --work /tmp/step-work \
      --variant "floor=probe:.probes/baseline70b.py --mode tpbase --layers 16 --mbs 2" \
      --variant "miss_fp8=train:$SLICE model.base_precision=fp8" \
      --variant "miss_fp8_liger=train:$SLICE model.base_precision=fp8 model.kernels=liger" \
      --variant "miss_auto=train:$SLICE model.recompute_layers=auto" \
      --variant "miss_liger_auto=train:$SLICE model.kernels=liger model.recompute_layers=auto" \
      --variant "miss_fp8_liger_auto=train:$SLICE model.base_precision=fp8 model.kernels=liger model.recompute_layers=auto" \
      2>&1 | grep -v Warning | tee "$LOGS/ligerstep.txt" ;;
  ligerfull) python3 tools/bench.py step --gpus 1 --ref fp8_80_liger_auto --out "$LOGS/ligerfull" --work /tmp/step-work \
      --variant "fp8_80_liger_auto=train:configs/llama-70b-fp8-1gpu.yaml" 2>&1 | grep -v Warning | tee "$LOGS/ligerfull.txt" ;;
  pack) python3 tools/bench.py pack --preset llama7b --attn sdpa,flex_attention --out "$LOGS/pack" --work /tmp/pack-work \
      2>&1 | grep -v Warning | tee "$LOGS/pack.txt" ;;
  *) echo "unknown stage '$stage' (tests shapes layer4k layer7b layer70b model modelrounds modelprof step70b pack fp8tests fp8layer fp8model" \
       "fp8step fp8full ligertests ligermodel ligermodel7b ligerstep ligerfull)" >&2; exit 2 ;;
esac; tar czf "$OUT/logs.tgz" -C "$LOGS" .; done
