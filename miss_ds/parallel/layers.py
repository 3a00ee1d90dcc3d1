"""Column- and row-parallel MiSS layers: D is split exactly as the frozen base weight is split.

Column-parallel (q, k, v, gate, up: W split along out). Each rank computes ``agg(x) @ D_shard`` for its own
output columns; the input's gradient is summed by the one all-reduce the base layer needs anyway.
``miss`` D is split along out with the base; ``bat`` D by output blocks; ``mini`` D is shared (each rank
tiles it from its own output offset) and its gradient is summed over the TP group. A fused projection (Phi-3's
``qkv_proj``) holds one range of each part per rank: D's columns (``miss``) or blocks (``bat``) are taken from
the same ranges, so the layer is the single-device layer cut as its weight is.

Row-parallel (o, down: W split along in, input arrives split). Each rank aggregates its own input slice at
its global offset, adds the partial delta to its partial product, and the base's one all-reduce sums both:
MiSS adds no collective to the forward pass. D is replicated; its partial gradients are summed over the TP
group by one all-reduce in the backward pass of each layer (the cheapest correct scheme that keeps every
ZeRO stage and gradient accumulation unchanged: r x out elements, the size of one token block of r rows).
"""
from __future__ import annotations

import torch

from .. import functional as MF
from ..layers import DLayout, MissLayer
from .mappings import copy_to_tp, reduce_from_tp


class _ParallelMiss(MissLayer):
    """What both TP layers share: a replicated D gets its partial gradients summed over the TP group."""

    def forward_d(self) -> torch.Tensor:
        return copy_to_tp(self.miss_block, self.sharding.group) if self.d_layout.replicated else self.miss_block


class ColumnParallelMissLinear(_ParallelMiss):
    """MiSS over a weight split along out; the input is whole on every rank, the output stays split."""

    style = "column"

    def _local_geometry(self) -> MF.MissGeometry:
        g, s = self.full_geometry, self.sharding
        return MF.MissGeometry(g.mode, g.r, g.mini_r, g.in_features, s.sizes[s.rank], in_offset=0,
                               out_offset=s.offset)

    def _d_layout(self) -> DLayout:
        """``miss``: D's columns are split as W's rows (per fused part too); ``bat``: its blocks likewise."""
        g, split = self.full_geometry, self.sharding.split
        if g.mode == "miss":
            return DLayout(dim=1, split=split)
        if g.mode == "bat":
            return DLayout(dim=0, split=split.scaled(g.r))
        return DLayout()

    def tp_input(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank reads the whole input: its gradient is summed over the TP group."""
        return copy_to_tp(x, self.sharding.group)


class RowParallelMissLinear(_ParallelMiss):
    """MiSS over a weight split along in; the input arrives split, the output is summed over the TP group."""

    style = "row"

    def _local_geometry(self) -> MF.MissGeometry:
        g, s = self.full_geometry, self.sharding
        return MF.MissGeometry(g.mode, g.r, g.mini_r, s.sizes[s.rank], g.out_features, in_offset=s.offset,
                               out_offset=0)

    def tp_output(self, y: torch.Tensor) -> torch.Tensor:
        """The partial products summed over the TP group (one all-reduce)."""
        return reduce_from_tp(y, self.sharding.group)
