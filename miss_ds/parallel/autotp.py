"""DeepSpeed AutoTP adapter: shard a model's linears with DeepSpeed's own TP layers, then put MiSS on them.

DeepSpeed's ``LinearLayer`` (column) and ``LinearAllreduce`` (row) decide the partition (uneven and
head-aligned splits included) and attach universal-checkpoint metadata; the MiSS layers take over their
weight shards and partition sizes and run the forward pass themselves, so the adapter's communication is
fused with the base's (see ``miss_ds.parallel.layers``).
"""
from __future__ import annotations

from typing import Any, Optional

from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
from torch import nn
from torch.distributed import ProcessGroup

from .. import ds_compat
from ..config import LLAMA_TARGETS, MissConfig
from ..layers import Sharding, Style
from ..registry import register_layer
from .layers import ColumnParallelMissLinear, RowParallelMissLinear

#: Llama-family plan: which projection is split along out (column) and which along in (row).
LLAMA_TP_PLAN: dict[str, Style] = {
    "q_proj": "column", "k_proj": "column", "v_proj": "column", "gate_proj": "column", "up_proj": "column",
    "o_proj": "row", "down_proj": "row",
}
assert set(LLAMA_TP_PLAN) == set(LLAMA_TARGETS)


def tp_style(module_name: str, plan: dict[str, Style] = LLAMA_TP_PLAN) -> Optional[Style]:
    """How ``plan`` splits the module called ``module_name`` (by its last name component); None: replicated."""
    return plan.get(module_name.rpartition(".")[2])


def shard_sizes(module_name: str, style: Style, weight_shape: tuple[int, int], tp_size: int,
                tp_meta: Any) -> tuple[int, ...]:
    """The features of ``module_name``'s weight (out for a column split, in for a row split) each TP rank holds,
    in rank order: DeepSpeed AutoTP's split (uneven and head-aligned) for the ``tp_meta`` of the model's config."""
    out_features, in_features = weight_shape
    full = out_features if style == "column" else in_features
    return tuple(ds_compat.autotp_shard_sizes(full, tp_size, tp_meta, module_name))


def shard_model(model: nn.Module, group: Optional[ProcessGroup], plan: dict[str, Style] = LLAMA_TP_PLAN,
                grain: int = 1) -> int:
    """Replace every linear that ``plan`` splits with DeepSpeed's TP layer.

    Other modules (embeddings, norms, lm_head) stay replicated. Uneven MLP splits keep every shard a multiple
    of ``grain`` (DeepSpeed's tp_grain_size). Marks the model so that ``deepspeed.initialize`` does not
    partition it again. Returns how many layers were split.
    """
    meta = ds_compat.autotp_meta(getattr(model, "config", None), grain)
    layer_types = {"column": LinearLayer, "row": LinearAllreduce}
    count = 0
    for name, module in list(model.named_modules()):
        style = tp_style(name, plan)
        if style is None or not isinstance(module, nn.Linear):
            continue
        layer = layer_types[style](module, group, tp_meta=meta, name=name)
        split = ds_compat.autotp_split(layer)
        if split.sizes != shard_sizes(name, style, split.full_shape, len(split.sizes), meta):
            raise RuntimeError(f"DeepSpeed split '{name}' as {list(split.sizes)}, not as miss_ds.parallel.autotp."
                               "shard_sizes says (the split tools/reshard.py writes): DeepSpeed changed its rule")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        count += 1
    ds_compat.mark_tp_split(model)
    return count


def sharding_of(module: nn.Module) -> Optional[Sharding]:
    """The split of a DeepSpeed ``LinearLayer`` (column) or ``LinearAllreduce`` (row); None for other modules."""
    if not isinstance(module, (LinearLayer, LinearAllreduce)):
        return None
    split = ds_compat.autotp_split(module)
    return Sharding("column" if isinstance(module, LinearLayer) else "row", split.sizes, split.rank, split.group)


def _column(layer: LinearLayer, config: MissConfig, name: str) -> ColumnParallelMissLinear:
    if type(layer) is not LinearLayer or layer.gather_output:
        raise ValueError(f"module '{name}' is a {type(layer).__name__} (gather_output={layer.gather_output}); "
                         "MiSS supports plain column-parallel layers whose output stays split")
    split = ds_compat.autotp_split(layer)
    return ColumnParallelMissLinear(layer.weight, layer.bias, config=config, name=name, group=split.group,
                                    partition_sizes=split.sizes, tp_rank=split.rank, full_shape=split.full_shape)


def _row(layer: LinearAllreduce, config: MissConfig, name: str) -> RowParallelMissLinear:
    if type(layer) is not LinearAllreduce:
        raise ValueError(f"module '{name}' is a {type(layer).__name__}; MiSS supports plain row-parallel layers")
    split = ds_compat.autotp_split(layer)
    return RowParallelMissLinear(layer.weight, layer.bias, config=config, name=name, group=split.group,
                                 partition_sizes=split.sizes, tp_rank=split.rank, full_shape=split.full_shape)


register_layer(LinearLayer, _column)
register_layer(LinearAllreduce, _row)
