"""Expected GPU memory per rank of a MiSS fine-tune, and whether it fits (model in miss_ds/memory_plan.py).

    miss-ds-plan-memory --config configs/llama-70b-tp2.yaml
    miss-ds-plan-memory --config configs/llama-70b-tp2.yaml --set model.recompute_layers=48 --gpu-gib 139.8
    miss-ds-plan-memory --config ... --world 2      # data-parallel size = world / tp_size

Exit code 0 when the plan fits, 1 when it does not.

The model's shape comes from ``model.path``'s config.json when it is there, else from ``--model-config`` (a config.json
or its directory), ``--shape`` (one of miss_ds.model_shape.KNOWN_SHAPES), or the known shape ``model.path`` names
(``/models/Llama-2-70b-hf`` is llama-2-70b), so the shipped configs plan on a machine without the model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import memory_plan
from ..model_shape import KNOWN_SHAPES, ModelShape, known_shape
from ..modeling import hf_config
from ..run_config import RunConfig, load_config

GIB = memory_plan.GIB


def model_shape(cfg: RunConfig, model_config: str | None, shape: str | None) -> ModelShape:
    """The shape to plan for; see the module docstring for the order of sources."""
    if model_config is not None:
        from transformers import AutoConfig

        path = Path(model_config)
        return ModelShape.from_config(AutoConfig.from_pretrained(path.parent if path.is_file() else path))
    if shape is not None:
        return KNOWN_SHAPES[shape]
    path = cfg.model.path
    if path is None or (Path(path) / "config.json").is_file():
        return ModelShape.from_config(hf_config(cfg.model))
    known = known_shape(Path(path).name)
    if known is None:
        sys.exit(f"error: model.path={path} has no config.json here and names no known shape: pass --model-config "
                 f"<config.json> or --shape one of {', '.join(sorted(KNOWN_SHAPES))}")
    print(f"model.path={path} is not here: planning with the known shape it names, {known}")
    return known


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="miss-ds-plan-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--world", type=int, default=None, help="ranks in the job (default: tp_size, i.e. DP=1)")
    p.add_argument("--gpu-gib", type=float, default=139.8, help="GPU memory (H200: 139.8, H100: 79.1)")
    p.add_argument("--model-config", default=None, help="the model's config.json (or its directory)")
    p.add_argument("--shape", default=None, choices=sorted(KNOWN_SHAPES), help="a known model shape")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set, check_files=False)
    shape = model_shape(cfg, args.model_config, args.shape)
    tp, t = cfg.parallel.tp_size, cfg.train
    dp = (args.world or tp) // tp
    seq = cfg.data.seq_len
    kw = dict(tp=tp, dp=dp, zero=cfg.parallel.zero_stage, offload=cfg.parallel.offload_optimizer,
              micro_batch=t.micro_batch_size, seq=seq, r=cfg.miss.r, mode=cfg.miss.mode, mini_r=cfg.miss.mini_r,
              base_precision=cfg.model.base_precision, kernels=cfg.model.kernels)
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
          + (f" mini_r={cfg.miss.mini_r}" if cfg.miss.mode == "mini" else "")
          + (", FP8 base" if cfg.model.base_precision == "fp8" else "")
          + (", Liger kernels" if cfg.model.kernels == "liger" else ""))
    for name, value in plan.rows():
        print(f"  {name:28s} {value / GIB:8.2f} GiB")
    fits = plan.total <= args.gpu_gib * GIB
    print(f"  {'fits' if fits else 'DOES NOT FIT'} in {args.gpu_gib} GiB "
          f"({100 * plan.total / (args.gpu_gib * GIB):.0f}% of the GPU)")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
