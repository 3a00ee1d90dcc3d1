"""Megatron-core's tensor-parallel linears as MiSS layers: ``apply_miss`` on a Megatron model.

``ColumnParallelLinear`` and ``RowParallelLinear`` split W as the AutoTP layers do (column along out, row along in,
in equal parts), so the column and row MiSS layers take their shards unchanged and D is split the same way. The
subclasses keep Megatron's interface: ``forward`` returns ``(output, bias)``, the bias handed back instead of added
when the layer was built with ``skip_bias_add``. Supported: ``gather_output=False``, ``input_is_parallel=True``,
no sequence parallelism and no expert parallelism (those replace the mappings the MiSS layers use).

Importing this module registers both layer types with :func:`miss_ds.apply_miss` (``apply_miss`` imports it when
Megatron's tensor-parallel layers are loaded).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from ..config import MissConfig
from ..layers import Split
from ..registry import register_layer
from .layers import ColumnParallelMissLinear, RowParallelMissLinear

Output = tuple[torch.Tensor, Optional[torch.Tensor]]


def _checked(layer: ColumnParallelLinear | RowParallelLinear, name: str) -> tuple[Split, int]:
    """Refuse what the MiSS layers do not implement; return the (equal) split and this rank's index."""
    unsupported = [what for what, present in (
        ("gather_output=True", getattr(layer, "gather_output", False)),
        ("input_is_parallel=False", not getattr(layer, "input_is_parallel", True)),
        ("sequence_parallel=True", layer.sequence_parallel),
        ("expert parallelism", layer.is_expert)) if present]
    if unsupported:
        raise ValueError(f"module '{name}' is a Megatron {type(layer).__name__} with {', '.join(unsupported)}; "
                         "MiSS supports column layers whose output stays split and row layers whose input arrives "
                         "split, without sequence or expert parallelism")
    tp = dist.get_world_size(layer.tp_group)
    split = layer.output_size if isinstance(layer, ColumnParallelLinear) else layer.input_size
    return Split.contiguous([split // tp] * tp), dist.get_rank(layer.tp_group)


class _MegatronMiss:
    """What both Megatron MiSS layers add to the column/row layer: construction from the Megatron layer, and
    Megatron's ``(output, bias)`` result."""

    def __init__(self, layer: ColumnParallelLinear | RowParallelLinear, config: MissConfig, name: str) -> None:
        split, rank = _checked(layer, name)
        super().__init__(layer.weight, layer.bias, config=config, name=name, group=layer.tp_group,
                         split=split, tp_rank=rank, full_shape=(layer.output_size, layer.input_size))
        self.skip_bias_add = layer.skip_bias_add

    def forward(self, x: torch.Tensor) -> Output:
        y = self.product(x)
        if self.skip_bias_add or self.bias is None:
            return y, self.bias if self.skip_bias_add else None
        return y + self.bias, None


class MegatronColumnMissLinear(_MegatronMiss, ColumnParallelMissLinear):
    """MiSS over Megatron's ColumnParallelLinear (weight split along out; the bias is split with it)."""

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> Output:
        if weight is not None or runtime_gather_output:
            raise ValueError(f"'{self.name}': MiSS layers use their own frozen weight and keep the output split")
        return super().forward(x)


class MegatronRowMissLinear(_MegatronMiss, RowParallelMissLinear):
    """MiSS over Megatron's RowParallelLinear (weight split along in; the bias is whole, added after the sum)."""


register_layer(ColumnParallelLinear, MegatronColumnMissLinear)
register_layer(RowParallelLinear, MegatronRowMissLinear)
