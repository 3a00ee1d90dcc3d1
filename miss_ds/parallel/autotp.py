"""DeepSpeed AutoTP adapter: shard a model's linears with DeepSpeed's own TP layers, then put MiSS on them.

Which projection is split how is the model family's TP plan (:mod:`miss_ds.families`). DeepSpeed's ``LinearLayer``
(column), ``LinearAllreduce`` (row) and ``SubParamLinearLayer`` (a fused column projection such as Phi-3's
``qkv_proj``: each part split as that projection alone would be, a rank holding its shard of every part) decide the
partition (uneven and head-aligned splits included) and attach universal-checkpoint metadata; the MiSS layers take
over their weight shards and split and run the forward pass themselves, so the adapter's communication is fused
with the base's (see ``miss_ds.parallel.layers``). Model code that reads full widths is fixed for the rank by
``miss_ds.parallel.internals``.
"""
from __future__ import annotations

from typing import Any, Optional

from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, SubParamLinearLayer
from torch import nn
from torch.distributed import ProcessGroup

from .. import ds_compat
from ..config import MissConfig
from ..families import Style, check_tp, family_of
from ..layers import Sharding, Split
from ..registry import register_layer
from .internals import localize
from .layers import ColumnParallelMissLinear, RowParallelMissLinear
from .mappings import tp_world_size

COLUMN_LAYERS = (LinearLayer, SubParamLinearLayer)


def planned_split(config: Any, module_name: str, weight_shape: tuple[int, int], tp_size: int,
                  tp_meta: Any) -> Optional[tuple[Style, Split]]:
    """How a run with ``tp_size`` ranks splits the linear ``module_name`` of a model of ``config`` (weight (out,
    in)): the family plan's style and DeepSpeed AutoTP's sizes for the ``tp_meta`` of the config, per part for a
    fused projection; None for a linear the plan leaves whole."""
    family = family_of(config)
    style = family.tp_style(module_name)
    if style is None:
        return None
    out_features, in_features = weight_shape
    widths = family.fused_widths(module_name, config) if style == "column" else None
    if widths is not None and sum(widths) != out_features:
        raise ValueError(f"'{module_name}' has {out_features} outputs, but the {family.name} config makes its fused "
                         f"parts {list(widths)}: a config that does not describe the model")
    widths = widths or (out_features if style == "column" else in_features,)
    return style, Split(tuple(tuple(ds_compat.autotp_shard_sizes(w, tp_size, tp_meta, module_name)) for w in widths))


def shard_model(model: nn.Module, group: Optional[ProcessGroup], grain: int = 1) -> int:
    """Replace every linear that the model family's plan splits with DeepSpeed's TP layer, and fix the model code
    that reads full widths for this rank.

    Other modules (embeddings, norms, lm_head, routers) stay replicated. Uneven MLP splits keep every shard a
    multiple of ``grain`` (DeepSpeed's tp_grain_size). Marks the model so that ``deepspeed.initialize`` does not
    partition it again. Returns how many linears were split.
    """
    config = model.config
    family = family_of(config)
    tp = tp_world_size(group)
    check_tp(config, tp)
    meta = ds_compat.autotp_meta(config, grain)
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        planned = planned_split(config, name, tuple(module.weight.shape), tp, meta)
        if planned is None:
            continue
        style, split = planned
        if style == "row":
            layer = LinearAllreduce(module, group, tp_meta=meta, name=name)
        elif len(split.parts) > 1:
            widths = tuple(sum(part) for part in split.parts)
            layer = SubParamLinearLayer(module, group, shape=(widths, -1), partition_dim=0, tp_meta=meta, name=name)
        else:
            layer = LinearLayer(module, group, tp_meta=meta, name=name)
        if ds_compat.autotp_split(layer).parts != split.parts:
            raise RuntimeError(f"DeepSpeed split '{name}' as {ds_compat.autotp_split(layer).parts}, not as "
                               f"miss_ds.parallel.autotp.planned_split says ({split.parts}, the split tools/reshard.py "
                               "writes): DeepSpeed changed its rule")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        count += 1
    if tp > 1:
        localize(model, family, group, meta, sharding_of)
    ds_compat.mark_tp_split(model)
    return count


def sharding_of(module: nn.Module) -> Optional[Sharding]:
    """The split of a DeepSpeed column or row layer; None for other modules."""
    if not isinstance(module, (*COLUMN_LAYERS, LinearAllreduce)):
        return None
    split = ds_compat.autotp_split(module)
    style = "row" if isinstance(module, LinearAllreduce) else "column"
    return Sharding(style, Split(split.parts), split.rank, split.group)


def _column(layer: LinearLayer | SubParamLinearLayer, config: MissConfig, name: str) -> ColumnParallelMissLinear:
    if type(layer) not in COLUMN_LAYERS or getattr(layer, "gather_output", False):
        raise ValueError(f"module '{name}' is a {type(layer).__name__} (gather_output="
                         f"{getattr(layer, 'gather_output', False)}); "
                         "MiSS supports plain column-parallel layers whose output stays split")
    split = ds_compat.autotp_split(layer)
    return ColumnParallelMissLinear(layer.weight, layer.bias, config=config, name=name, group=split.group,
                                    split=Split(split.parts), tp_rank=split.rank, full_shape=split.full_shape)


def _row(layer: LinearAllreduce, config: MissConfig, name: str) -> RowParallelMissLinear:
    if type(layer) is not LinearAllreduce:
        raise ValueError(f"module '{name}' is a {type(layer).__name__}; MiSS supports plain row-parallel layers")
    split = ds_compat.autotp_split(layer)
    return RowParallelMissLinear(layer.weight, layer.bias, config=config, name=name, group=split.group,
                                 split=Split(split.parts), tp_rank=split.rank, full_shape=split.full_shape)


register_layer(LinearLayer, _column)
register_layer(SubParamLinearLayer, _column)
register_layer(LinearAllreduce, _row)
