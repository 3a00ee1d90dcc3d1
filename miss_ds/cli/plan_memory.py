"""Expected GPU memory per rank of a MiSS fine-tune, and whether it fits (model in miss_ds/memory_plan.py).

    miss-ds-plan-memory --config configs/llama-70b-tp2.yaml
    miss-ds-plan-memory --config configs/llama-70b-tp2.yaml --set model.recompute_layers=48 --gpu-gib 139.8
    miss-ds-plan-memory --config ... --world 2      # data-parallel size = world / tp_size

Exit codes: 0 the plan fits; 1 it does not fit; 2 bad input (the config, a flag, a TP size the model's key/value
heads or --world cannot take), refused in one "error:" line.

The model's shape comes from ``model.path``'s config.json when it is there, else from ``--model-config`` (a config.json
or its directory), ``--shape`` (one of miss_ds.model_shape.KNOWN_SHAPES), or the known shape ``model.path`` names
(``/models/Llama-2-70b-hf`` is llama-2-70b), so the shipped configs plan on a machine without the model.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from .. import memory_plan
from ..families import check_tp
from ..model_shape import KNOWN_SHAPES, ModelShape, known_shape
from ..modeling import hf_config
from ..run_config import ConfigError, RunConfig, load_config
from .errors import reports_input_errors

GIB = memory_plan.GIB


def model_shape(cfg: RunConfig, model_config: str | None, shape: str | None) -> ModelShape:
    """The shape to plan for; see the module docstring for the order of sources."""
    if model_config is not None:
        return config_file_shape(model_config)
    if shape is not None:
        return KNOWN_SHAPES[shape]
    path = cfg.model.path
    if path is None or (Path(path) / "config.json").is_file():
        return ModelShape.from_config(hf_config(cfg.model))
    known = known_shape(Path(path).name)
    if known is None:
        raise ConfigError(f"model.path={path} has no config.json here and names no known shape: pass --model-config "
                          f"<config.json> or --shape one of {', '.join(sorted(KNOWN_SHAPES))}")
    print(f"model.path={path} is not here: planning with the known shape it names, {known}")
    return known


def config_file_shape(given: str) -> ModelShape:
    """The shape in ``--model-config`` ``given``: a config.json, or the directory holding one. A path that is not
    there, or a file transformers cannot read as a model config, is refused naming the flag."""
    from transformers import AutoConfig

    path = Path(given)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--model-config {given}: {file} does not exist; pass a model's config.json or its "
                          "directory")
    try:
        config = AutoConfig.from_pretrained(file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model-config {given}: {file} is not a model config transformers can read: "
                          f"{' '.join(str(exc).split())}") from None
    return ModelShape.from_config(config)


def gpu_bytes(gib: float) -> float:
    """``--gpu-gib`` in bytes, refused unless a finite number > 0 (a negative size would plan nothing that fits)."""
    if not (math.isfinite(gib) and gib > 0):
        raise ConfigError(f"--gpu-gib={gib} must be a positive number of GiB (H200: 139.8, H100: 79.1)")
    return gib * GIB


def data_parallel_size(world: Optional[int], tp: int) -> int:
    """The planned job's data-parallel size: ``world`` ranks (None: ``tp``, i.e. DP=1) in TP groups of ``tp``. A world
    that is not a positive multiple of ``tp`` is refused: no job lays its ranks out so."""
    world = tp if world is None else world
    if world < 1 or world % tp:
        raise ConfigError(f"--world={world} must be a positive multiple of parallel.tp_size={tp} (the data-parallel "
                          f"size is world / tp_size): e.g. --world {tp}")
    return world // tp


def check_heads(shape: ModelShape, tp: int, world: int) -> None:
    """Refuse a TP size the model's attention cannot be split over, by training's rule (``families.check_tp``, read
    from the shape's head counts: a known shape has no Hugging Face config)."""
    heads = SimpleNamespace(model_type=shape.model_type, num_attention_heads=shape.heads,
                            num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, hidden_size=shape.hidden)
    check_tp(heads, tp, world)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="miss-ds-plan-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (see configs/); its files need not be here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config entry, as miss-ds-train's --set (repeatable)")
    p.add_argument("--world", type=int, default=None,
                   help="ranks in the job, a multiple of parallel.tp_size (default: tp_size, i.e. DP=1)")
    p.add_argument("--gpu-gib", type=float, default=139.8, help="GPU memory in GiB, > 0 (H200: 139.8, H100: 79.1)")
    p.add_argument("--model-config", default=None, help="the model's config.json (or its directory)")
    p.add_argument("--shape", default=None, choices=sorted(KNOWN_SHAPES), help="a known model shape")
    args = p.parse_args(argv)
    gpu = gpu_bytes(args.gpu_gib)
    cfg = load_config(args.config, args.set, check_files=False)
    tp, t = cfg.parallel.tp_size, cfg.train
    dp = data_parallel_size(args.world, tp)
    shape = model_shape(cfg, args.model_config, args.shape)
    check_heads(shape, tp, tp * dp)
    seq = cfg.data.seq_len
    kw = dict(tp=tp, dp=dp, zero=cfg.parallel.zero_stage, offload=cfg.parallel.offload_optimizer,
              micro_batch=t.micro_batch_size, seq=seq, r=cfg.miss.r, mode=cfg.miss.mode, mini_r=cfg.miss.mini_r,
              base_precision=cfg.model.base_precision, kernels=cfg.model.kernels)
    wanted = cfg.model.recompute_layers
    if not cfg.model.gradient_checkpointing:
        recompute = 0
    elif wanted == "auto":
        recompute = memory_plan.auto_recompute_layers(shape, gpu, **kw)
    else:
        recompute = shape.layers if wanted is None else wanted
    plan = memory_plan.plan(shape, recompute=recompute, **kw)
    print(f"{args.config}: TP={tp} DP={dp} ZeRO-{cfg.parallel.zero_stage} micro-batch {t.micro_batch_size} x seq "
          f"{seq}, {recompute} of {shape.layers} layers recompute, MiSS {cfg.miss.mode} r={cfg.miss.r}"
          + (f" mini_r={cfg.miss.mini_r}" if cfg.miss.mode == "mini" else "")
          + (", FP8 base" if cfg.model.base_precision == "fp8" else "")
          + (", Liger kernels" if cfg.model.kernels == "liger" else ""))
    for name, value in plan.rows():
        print(f"  {name:28s} {value / GIB:8.2f} GiB")
    fits = plan.total <= gpu
    print(f"  {'fits' if fits else 'DOES NOT FIT'} in {args.gpu_gib} GiB ({100 * plan.total / gpu:.0f}% of the GPU)")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
