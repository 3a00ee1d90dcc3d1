"""Column- and row-parallel MiSS layers: D is split exactly as the frozen base weight is split.

Column-parallel (q, k, v, gate, up: W split along out). Each rank computes ``agg(x) @ D_shard`` for its own
output columns; the input's gradient is summed by the one all-reduce the base layer needs anyway.
``miss`` D is split along out with the base; ``bat`` D by output blocks; ``mini`` D is shared (each rank
tiles it from its own output offset) and its gradient is summed over the TP group.

Row-parallel (o, down: W split along in, input arrives split). Each rank aggregates its own input slice at
its global offset, adds the partial delta to its partial product, and the base's one all-reduce sums both:
MiSS adds no collective to the forward pass. D is replicated; its partial gradients are summed over the TP
group by one all-reduce in the backward pass of each layer (the cheapest correct scheme that keeps every
ZeRO stage and gradient accumulation unchanged: r x out elements, the size of one token block of r rows).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .. import functional as MF
from ..config import MissConfig
from .mappings import copy_to_tp, reduce_from_tp


class _ParallelMissLinear(nn.Module):
    """Shared state of the column and row layers: the frozen shard, the local D and where both sit."""

    parallel: str

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, config: MissConfig, name: str,
                 group: Optional[ProcessGroup], partition_sizes: Sequence[int], tp_rank: int,
                 full_shape: tuple[int, int]) -> None:
        super().__init__()
        out_full, in_full = full_shape
        MF.check_layer(name, config.mode, config.r, config.mini_r, in_full, out_full)
        self.name, self.group = name, group
        self.partition_sizes, self.tp_rank = tuple(partition_sizes), tp_rank
        self.full_shape = (out_full, in_full)
        self.full_geometry = MF.MissGeometry(config.mode, config.r, config.mini_r, in_full, out_full)
        self.geometry = self._local_geometry(self.full_geometry, sum(partition_sizes[:tp_rank]),
                                             partition_sizes[tp_rank])
        self._check_shards()
        self.weight, self.bias = weight, bias
        for p in (weight, bias):
            if p is not None:
                p.requires_grad_(False)
        dtype = torch.float32 if config.adapter_dtype == "float32" else weight.dtype
        # Every rank draws the full D from the same RNG state and keeps its part, so a TP run starts from
        # exactly the D of the TP=1 run with the same seed.
        full_d = MF.init_d(self.full_geometry, zeros=config.init_weights, dtype=dtype, device=weight.device)
        self.miss_block = nn.Parameter(self.shard_d(full_d))
        self.miss_block.miss_tp_layout = self.d_layout()
        # Megatron's and DeepSpeed's mark for a TP-split parameter: gradient norms count every shard once,
        # and replicated parameters once per TP group.
        self.miss_block.tensor_model_parallel = not self.d_replicated
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None

    def _local_geometry(self, g: MF.MissGeometry, offset: int, size: int) -> MF.MissGeometry:
        raise NotImplementedError

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        return y if self.bias is None else y + self.bias

    def _check_shards(self) -> None:
        """``bat`` works on whole r x r blocks, so every shard boundary must fall on a block boundary."""
        r = self.full_geometry.r
        if self.full_geometry.mode == "bat" and any(s % r for s in self.partition_sizes):
            dim = "out_features" if self.parallel == "column" else "in_features"
            raise MF.MissShapeError(
                f"miss.mode='bat' with r={r} cannot split module '{self.name}' ({self.parallel}-parallel, "
                f"{dim} shards {list(self.partition_sizes)}): every shard must be a multiple of r. Use an r "
                f"dividing all shards, or set parallel.tp_grain_size to a multiple of {r}")

    def d_layout(self) -> dict:
        """How the local D relates to the full D: split along ``dim`` in ``sizes``, or replicated (dim None)."""
        g = self.full_geometry
        if self.parallel == "column" and g.mode == "miss":
            return {"dim": 1, "sizes": list(self.partition_sizes)}
        if self.parallel == "column" and g.mode == "bat":
            return {"dim": 0, "sizes": [s // g.r for s in self.partition_sizes]}
        return {"dim": None, "sizes": None}

    def shard_d(self, full_d: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full D."""
        layout = self.d_layout()
        if layout["dim"] is None:
            return full_d.clone()
        return full_d.split(layout["sizes"], dim=layout["dim"])[self.tp_rank].clone()

    @property
    def d_replicated(self) -> bool:
        return self.d_layout()["dim"] is None

    def _d_for_forward(self) -> torch.Tensor:
        """D as used in forward: a replicated D gets its partial gradients summed over the TP group."""
        return copy_to_tp(self.miss_block, self.group) if self.d_replicated else self.miss_block

    @torch.no_grad()
    def merged_shard(self) -> torch.Tensor:
        """The local shard of the merged weight W'."""
        return MF.merge(self.weight, self.miss_block, self.geometry)

    def extra_repr(self) -> str:
        g = self.full_geometry
        return (f"{self.parallel}-parallel, full (out={g.out_features}, in={g.in_features}), shards "
                f"{list(self.partition_sizes)}, rank {self.tp_rank}, mode={g.mode}, r={g.r}")


class ColumnParallelMissLinear(_ParallelMissLinear):
    """MiSS over a weight split along out; the input is whole on every rank, the output stays split."""

    parallel = "column"

    def _local_geometry(self, g: MF.MissGeometry, offset: int, size: int) -> MF.MissGeometry:
        return MF.MissGeometry(g.mode, g.r, g.mini_r, g.in_features, size, in_offset=0, out_offset=offset)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted product of this rank's columns, without bias."""
        return MF.adapted_linear(copy_to_tp(x, self.group), self.weight, self._d_for_forward(), self.geometry,
                                 self.dropout)


class RowParallelMissLinear(_ParallelMissLinear):
    """MiSS over a weight split along in; the input arrives split, the output is summed over the TP group."""

    parallel = "row"

    def _local_geometry(self, g: MF.MissGeometry, offset: int, size: int) -> MF.MissGeometry:
        return MF.MissGeometry(g.mode, g.r, g.mini_r, size, g.out_features, in_offset=offset, out_offset=0)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted product summed over the TP group (one all-reduce), without bias."""
        partial = MF.adapted_linear(x, self.weight, self._d_for_forward(), self.geometry, self.dropout)
        return reduce_from_tp(partial, self.group)
