"""Rewrite a miss_ds adapter for another tensor-parallel size.

The new split is the one a run with the new TP size makes: the base model's modules are built on the meta
device, each adapted module is wrapped as ``shard_model`` + ``apply_miss`` would wrap it (``planned_split`` of
:mod:`miss_ds.parallel.autotp` on the same config, fused projections per part), and that layer's own
``d_layout`` says how its D is split (``modules_to_save`` parameters stay replicated). A split the mode cannot
carry (``bat`` shards that cut an r x r block) raises ``MissShapeError`` naming the layer, exactly as starting
such a run would. Only the adapter is rewritten (training checkpoints resume on any TP size as they are).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .. import adapter_io, ds_compat
from ..adapter_io import AdapterMismatch
from ..config import MissConfig
from ..families import check_tp
from ..fingerprint import Fingerprint
from ..hf_checkpoint import HFCheckpoint
from ..layers import DLayout, MissLayer, MissLinear
from ..loading import build_model_on_meta
from ..parallel.autotp import planned_split
from ..parallel.layers import ColumnParallelMissLinear, RowParallelMissLinear
from .output import new_output_dir, write_run_config
from .source import check_fits_base, module_of, read_adapter, read_base_config


def reshard_adapter(checkpoint: Path | str, tp_size: int, output: Path | str,
                    base: Optional[Path | str] = None, tp_grain_size: int = 1) -> Path:
    """Write the adapter of ``checkpoint`` to ``output`` split for ``tp_size`` ranks.

    The partition needs the base model's config: from ``base`` (a model directory, checked against the
    adapter, its fingerprint included) or else rebuilt from the base summary stored in the adapter; and the run's
    ``tp_grain_size``. The new adapter keeps the base summary and fingerprint.
    """
    if tp_size < 1:
        raise ValueError(f"--tp must be a positive integer, got {tp_size}")
    adapter = read_adapter(checkpoint)
    if base is not None:
        config = read_base_config(base)
        with HFCheckpoint(base) as weights:
            check_fits_base(adapter, config, weights)
    else:
        config = config_from_summary(adapter.meta["base_model"], adapter.directory)
    view = tp_view(config, adapter.config, [module_of(key) for key in adapter.d], tp_size, tp_grain_size)
    layouts = adapter_io.layouts(view, adapter.config)
    if set(layouts) != set(adapter.tensors):
        raise AdapterMismatch(f"{adapter.directory}: its tensors and those a run with its config holds differ in "
                              f"{sorted(set(adapter.tensors) ^ set(layouts))[:3]}: inconsistent adapter")
    for key, tensor in adapter.tensors.items():
        if layouts[key]["full_shape"] != list(tensor.shape):
            raise AdapterMismatch(f"'{key}' has shape {list(tensor.shape)} but the base config makes it "
                                  f"{layouts[key]['full_shape']}: pass the real base model with --base")
    out = new_output_dir(output)
    recorded = adapter.meta.get("base_fingerprint")
    adapter_io.write_adapter_config(out, adapter.config, view, tp_size,
                                    None if recorded is None else Fingerprint.from_json(recorded))
    for rank in range(tp_size):
        parts = {key: _part(tensor, layouts[key], rank) for key, tensor in adapter.tensors.items()}
        adapter_io.write_adapter_shard(out, parts, rank, tp_size)
    write_run_config(out, adapter.run_config)
    return out


def config_from_summary(summary: dict[str, Any], source: Path) -> PretrainedConfig:
    """A config with the shape fields the adapter recorded about its base (enough for standard models). No padding
    token: the class's default id may lie outside a small vocabulary, and the view needs none."""
    if "model_type" not in summary:
        raise AdapterMismatch(f"{source} records no base model_type: pass the base model with --base")
    fields = {k: v for k, v in summary.items() if k not in ("model_type", "name_or_path")}
    config = AutoConfig.for_model(summary["model_type"], **fields, pad_token_id=None)
    config._name_or_path = summary.get("name_or_path", "")
    return config


def tp_view(config: PretrainedConfig, miss: MissConfig, modules: Iterable[str], tp_size: int,
            tp_grain_size: int = 1) -> nn.Module:
    """The base model on meta with each of ``modules`` replaced by the MiSS layer TP rank 0 would build."""
    check_tp(config, tp_size, key="--tp")
    model = build_model_on_meta(config)
    tp_meta = ds_compat.autotp_meta(config, tp_grain_size)
    for name in modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise AdapterMismatch(f"the adapter adapts '{name}', which the base model does not have: wrong "
                                  "base?") from None
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"'{name}' is a {type(linear).__name__} in the base model, not a linear layer")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _layer(linear, name, config, miss, tp_size, tp_meta))
    return model


def _layer(linear: nn.Linear, name: str, model_config: PretrainedConfig, config: MissConfig, tp_size: int,
           tp_meta: Any) -> MissLayer:
    """``shard_model``'s rule: a planned projection is split when TP > 1, anything else stays whole."""
    full_shape = tuple(linear.weight.shape)
    planned = planned_split(model_config, name, full_shape, tp_size, tp_meta) if tp_size > 1 else None
    if planned is None:
        return MissLinear(linear, config, name)
    style, split = planned
    size = split.sizes[0]
    shard_shape = (size, full_shape[1]) if style == "column" else (full_shape[0], size)
    cls = ColumnParallelMissLinear if style == "column" else RowParallelMissLinear
    return cls(nn.Parameter(torch.empty(shard_shape, device="meta"), requires_grad=False), None, config=config,
               name=name, full_shape=full_shape, split=split, tp_rank=0, group=None)


def _part(full: torch.Tensor, layout: dict[str, Any], rank: int) -> torch.Tensor:
    """TP rank ``rank``'s part of a full tensor under its adapter-file layout."""
    return DLayout.from_json(layout).part(full, rank)
