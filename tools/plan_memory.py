"""Expected GPU memory per rank of a MiSS fine-tune, and whether it fits (model in miss_ds/memory_plan.py).

    python tools/plan_memory.py --config configs/llama-70b-tp2.yaml
    python tools/plan_memory.py --config configs/llama-70b-tp2.yaml --set model.recompute_layers=48 --gpu-gib 139.8
    python tools/plan_memory.py --config ... --world 2      # data-parallel size = world / tp_size
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miss_ds import memory_plan  # noqa: E402
from miss_ds.model_shape import ModelShape  # noqa: E402
from miss_ds.modeling import hf_config  # noqa: E402
from miss_ds.run_config import load_config  # noqa: E402

GIB = memory_plan.GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world", type=int, default=None, help="ranks in the job (default: tp_size, i.e. DP=1)")
    p.add_argument("--gpu-gib", type=float, default=139.8, help="GPU memory (H200: 139.8, H100: 79.1)")
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    shape = ModelShape.from_config(hf_config(cfg.model))
    tp, t = cfg.parallel.tp_size, cfg.train
    dp = (args.world or tp) // tp
    seq = cfg.data.seq_len
    kw = dict(tp=tp, dp=dp, zero=cfg.parallel.zero_stage, offload=cfg.parallel.offload_optimizer,
              micro_batch=t.micro_batch_size, seq=seq, r=cfg.miss.r, mode=cfg.miss.mode, mini_r=cfg.miss.mini_r)
    wanted = cfg.model.recompute_layers
    if not cfg.model.gradient_checkpointing:
        recompute = 0
    elif wanted == "auto":
        recompute = memory_plan.auto_recompute_layers(shape, args.gpu_gib * GIB, **kw)
    else:
        recompute = shape.layers if wanted is None else wanted
    plan = memory_plan.plan(shape, recompute=recompute, **kw)
    print(f"{args.config}: TP={tp} DP={dp} ZeRO-{cfg.parallel.zero_stage} micro-batch {t.micro_batch_size} x seq {seq}, "
          f"{recompute} of {shape.layers} layers recompute, MiSS {cfg.miss.mode} r={cfg.miss.r}"
          + (f" mini_r={cfg.miss.mini_r}" if cfg.miss.mode == "mini" else ""))
    for name, value in plan.rows():
        print(f"  {name:28s} {value / GIB:8.2f} GiB")
    fits = plan.total <= args.gpu_gib * GIB
    print(f"  {'fits' if fits else 'DOES NOT FIT'} in {args.gpu_gib} GiB "
          f"({100 * plan.total / (args.gpu_gib * GIB):.0f}% of the GPU)")
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    main()
