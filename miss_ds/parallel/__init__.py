"""Tensor-parallel MiSS: communication mappings, column/row MiSS layers, and adapters for TP engines."""
from .layers import ColumnParallelMissLinear, RowParallelMissLinear
from .mappings import copy_to_tp, reduce_from_tp

__all__ = ["ColumnParallelMissLinear", "RowParallelMissLinear", "copy_to_tp", "reduce_from_tp"]
