#!/usr/bin/env bash
# The 70B runs of docs/scale.md on one host with 2 H200s (device kind nvidia-h200-x2), from the repository root,
# with DeepSpeed and its missing dependencies as wheels in .whl/ and the shared baseline probe in .probes/ (it is not
# in the repository: mkdir -p .probes && cp ../shared/probes/baseline70b.py .probes/).
#   bash tools/scale_x2.sh smoke layer core modes recompute auto hfload peft      # stages to run, in order
set -uo pipefail
OUT=${OUT:-runs/scale}; LOGS=/tmp/scale-logs; WORK=/tmp/scale-work; mkdir -p "$OUT" "$LOGS" "$WORK"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$LOGS/env.txt"
python3 -c "import torch, transformers, peft, deepspeed; print(torch.__version__, transformers.__version__, peft.__version__, deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$LOGS/env.txt"
probe=".probes/baseline70b.py"
bench() { local stage=$1; shift; python3 tools/bench.py step --gpus 2 --ref floor --out "$LOGS/$stage" --work "$WORK/$stage" "$@" \
  | tee "$LOGS/$stage.txt"; }
for stage in "$@"; do case $stage in
  smoke) bench smoke --timeout 240 \
      --variant "floor=probe:$probe --mode tpbase --layers 4 --mbs 2" \
      --variant "miss=train:configs/llama-70b-tp2.yaml model.config.num_hidden_layers=4" ;;
  core) bench core --timeout 220 \
      --variant "floor=probe:$probe --mode tpbase --zinit --layers 80 --mbs 2 --steps 3 --warmup 1" \
      --variant "miss=train:configs/llama-70b-tp2.yaml" ;;
  modes) bench modes --timeout 220 \
      --variant "mini=train:configs/llama-70b-tp2.yaml miss.mode=mini miss.mini_r=64" \
      --variant "bat=train:configs/llama-70b-tp2.yaml miss.mode=bat" ;;
  layer) python3 tools/bench.py layer --tokens 8192 --in-features 8192 --out-features 14336 --r 64 \
      | tee "$LOGS/layer.txt" ;;
  recompute) bench recompute --timeout 220 \
      --variant "miss_rc64=train:configs/llama-70b-tp2.yaml model.recompute_layers=64" \
      --variant "miss_rc48=train:configs/llama-70b-tp2.yaml model.recompute_layers=48" ;;
  auto) bench auto --timeout 220 \
      --variant "miss_auto=train:configs/llama-70b-tp2.yaml model.recompute_layers=auto" \
      --variant "mini_auto=train:configs/llama-70b-tp2.yaml model.recompute_layers=auto miss.mode=mini miss.mini_r=64" ;;
  hfload) python3 tools/make_random_checkpoint.py --config configs/llama-70b-tp2.yaml --layers 8 --output /tmp/ckpt70b-8 \
      2>&1 | tail -1 | tee "$LOGS/hfload-write.txt"
    bench hfload --timeout 220 \
      --variant "load8=train:configs/llama-70b-tp2.yaml model.path=/tmp/ckpt70b-8 model.random_init=false model.config.num_hidden_layers=8 train.max_steps=4" ;;
  peft) bench peft --timeout 220 \
      --variant "peft_zero3=probe:$probe --mode zero3 --layers 80 --mbs 2 --steps 3 --warmup 1" ;;
esac; tar czf "$OUT/logs.tgz" -C "$LOGS" .; done
