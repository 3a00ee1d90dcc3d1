"""Test helper: reassemble full tensors from the TP shards of a live MiSS layer (the references compare whole tensors)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from miss_ds import functional as MF
from miss_ds.parallel.mappings import tp_world_size


def all_gather_uneven(shard: torch.Tensor, sizes: list[int], dim: int, group) -> torch.Tensor:
    """Concatenate every rank's shard along ``dim``; shards may differ in size (``sizes``, in rank order)."""
    if tp_world_size(group) == 1:
        return shard
    padded_shape = list(shard.shape)
    padded_shape[dim] = max(sizes)
    padded = shard.new_zeros(padded_shape)
    padded.narrow(dim, 0, shard.shape[dim]).copy_(shard)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


@torch.no_grad()
def full_d(layer: nn.Module) -> torch.Tensor:
    """The whole D of a layer (a copy of the local one when D is replicated)."""
    layout = getattr(layer.miss_block, "miss_tp_layout", {"dim": None})
    if layout["dim"] is None:
        return layer.miss_block.detach().clone()
    return all_gather_uneven(layer.miss_block.detach(), layout["sizes"], layout["dim"], layer.group)


@torch.no_grad()
def full_merged_weight(layer: nn.Module) -> torch.Tensor:
    """The whole merged weight W' of a (possibly tensor-parallel) MiSS layer."""
    if not hasattr(layer, "partition_sizes"):
        return MF.merge(layer.weight, layer.miss_block, layer.geometry)
    dim = 0 if layer.parallel == "column" else 1
    return all_gather_uneven(layer.merged_shard(), list(layer.partition_sizes), dim, layer.group)
