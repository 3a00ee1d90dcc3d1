"""DeepSpeed glue: the DeepSpeed config of a run, the TP split of the base, MiSS on top, and the engine around D.

``deepspeed_config`` is the one place a run config becomes DeepSpeed JSON (the trainer, the tools and the tests use
it); ``prepare_model`` splits the targeted linears over the TP group and wraps them with MiSS; ``initialize`` builds
the engine over the trainable parameters only.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Optional

import deepspeed
import torch
from torch import nn
from torch.distributed import ProcessGroup

from . import ds_compat
from .config import MissConfig
from .distributed import ParallelLayout
from .inject import TrainableReport, apply_miss, check_entries_match
from .run_config import RunConfig

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: RunConfig, device_type: str) -> dict[str, Any]:
    """The DeepSpeed JSON of a run: batch sizes, AdamW over D, clipping, ZeRO stage, bf16; the run's ``deepspeed:``
    section is merged over it, its values winning where it may set them (entries derived here from other sections
    are listed in ``run_config.DEEPSPEED_OWNED``, and a ``deepspeed:`` entry setting one is refused when the config
    is read).

    AdamW is torch's (``torch_adam``: DeepSpeed's own FusedAdam is a CUDA extension built at run time), in its fused
    form where its state lives on a CUDA GPU: one kernel, seven passes over tensors of D's size (D, its gradient
    and the two moments read, three written), where the default multi-tensor form runs eight kernels of 20 passes."""
    t, p = cfg.train, cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type != "cpu"}
    fused = device_type == "cuda" and not p.offload_optimizer
    ds = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum_steps,
          "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                    "weight_decay": t.weight_decay, "torch_adam": True,
                                                    "fused": fused}},
          "gradient_clipping": t.grad_clip, "zero_optimization": zero, "steps_per_print": 10**12,
          "bf16": {"enabled": cfg.model.dtype == "bfloat16"}, "wall_clock_breakdown": False}
    return merge_configs(ds, cfg.deepspeed)


def merge_configs(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in recursively; ``extra``'s values win."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_configs(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def tensor_parallel_group(tp_size: int) -> Optional[ProcessGroup]:
    """The TP group of this rank (DeepSpeed's mesh: ranks ``[k*tp, (k+1)*tp)`` form a group), or None for TP=1.
    ``ParallelLayout`` checks that ``tp_size`` divides the world size."""
    if tp_size <= 1:
        return None
    ParallelLayout(torch.distributed.get_rank(), torch.distributed.get_world_size(), tp_size)
    return ds_compat.init_tp_group(tp_size)


def prepare_model(model: nn.Module, miss: MissConfig, tp_size: int, tp_grain_size: int = 1) -> TrainableReport:
    """Check that every entry of the adapter's module lists matches a module (``inject.check_entries_match``: a run
    does this on the model built on the meta device, before any weight exists), split the targeted linears over the
    TP group (DeepSpeed's AutoTP layers), then wrap them with MiSS."""
    check_entries_match(model, miss)
    if tp_size > 1:
        from .parallel.autotp import shard_model

        shard_model(model, tensor_parallel_group(tp_size), grain=tp_grain_size)
    report = dataclasses.replace(apply_miss(model, miss), tp_size=tp_size)
    logger.info("%s", report)
    return report


def with_tensor_parallel(ds_config: dict[str, Any], tp_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a model prepared by ``prepare_model``.

    Adds ``tensor_parallel.autotp_size``: DeepSpeed then builds its DP groups across TP groups and skips its own
    partitioning, since the model is marked split. (ZeRO-3 never gets here: ``parallel.zero_stage=3`` and a
    ``deepspeed:`` override of the stage are refused when the config is read, ``run_config.ZERO3_REFUSAL`` says why.)
    """
    cfg = copy.deepcopy(ds_config)
    if tp_size > 1:
        cfg.setdefault("tensor_parallel", {})["autotp_size"] = tp_size
    return cfg


def initialize(model: nn.Module, ds_config: dict[str, Any], tp_size: int = 1, **kwargs: Any):
    """``deepspeed.initialize`` over the trainable parameters (D and modules_to_save) of a prepared model."""
    ds_compat.check_version()
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=with_tensor_parallel(ds_config, tp_size), **kwargs)
    return engine, optimizer, scheduler
