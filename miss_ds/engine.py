"""DeepSpeed glue: split the base for tensor parallelism, add MiSS, and build the engine around D alone."""
from __future__ import annotations

import copy
from typing import Any, Optional

import deepspeed
import torch
from torch import nn
from torch.distributed import ProcessGroup

from . import ds_compat
from .config import MissConfig
from .inject import TrainableReport, apply_miss


def tensor_parallel_group(tp_size: int) -> Optional[ProcessGroup]:
    """The TP group of this rank (DeepSpeed's mesh: ranks ``[k*tp, (k+1)*tp)`` form a group), or None for TP=1."""
    if tp_size <= 1:
        return None
    world = torch.distributed.get_world_size()
    if world % tp_size:
        raise ValueError(f"tensor_parallel.size={tp_size} does not divide the world size {world}")
    return ds_compat.init_tp_group(tp_size)


def prepare_model(model: nn.Module, miss: MissConfig, tp_size: int, tp_grain_size: int = 1) -> TrainableReport:
    """Split the targeted linears over the TP group (DeepSpeed's AutoTP layers), then wrap them with MiSS."""
    if tp_size > 1:
        from .parallel.autotp import shard_model

        shard_model(model, tensor_parallel_group(tp_size), grain=tp_grain_size)
    return apply_miss(model, miss)


def with_tensor_parallel(ds_config: dict[str, Any], model: nn.Module, tp_size: int) -> dict[str, Any]:
    """The DeepSpeed config for a model prepared by ``prepare_model``.

    Adds ``tensor_parallel.autotp_size`` (DeepSpeed then builds its DP groups across TP groups and skips its own
    partitioning, since the model is marked parsed). Under ZeRO-3 the frozen TP shards are made persistent:
    they are gathered once and stay resident, so only D, its gradient and optimizer state are partitioned
    over data-parallel ranks and no step re-gathers the base.
    """
    cfg = copy.deepcopy(ds_config)
    if tp_size > 1:
        cfg.setdefault("tensor_parallel", {})["autotp_size"] = tp_size
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        frozen = max((p.numel() for p in model.parameters() if not p.requires_grad), default=0)
        zero["stage3_param_persistence_threshold"] = max(frozen, int(zero.get("stage3_param_persistence_threshold", 0)))
    return cfg


def initialize(model: nn.Module, ds_config: dict[str, Any], tp_size: int = 1, **kwargs: Any):
    """``deepspeed.initialize`` over the trainable parameters (D and modules_to_save) of a prepared model."""
    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, config=with_tensor_parallel(ds_config, model, tp_size), **kwargs)
    return engine, optimizer, scheduler
