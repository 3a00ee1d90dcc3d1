"""Test helper: reassemble full tensors from the TP shards of a live MiSS layer (the references compare whole tensors)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from miss_ds.layers import MissLayer
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
def full_d(layer: MissLayer) -> torch.Tensor:
    """The whole D of a layer (a copy of the local one when D is replicated)."""
    layout = layer.d_layout
    if layout.replicated:
        return layer.miss_block.detach().clone()
    return all_gather_uneven(layer.miss_block.detach(), list(layout.sizes), layout.dim, layer.sharding.group)


@torch.no_grad()
def full_merged_weight(layer: MissLayer) -> torch.Tensor:
    """The whole merged weight W' of a (possibly tensor-parallel) MiSS layer."""
    span = layer.sharding.span("weight")
    if span is None:
        return layer.merged_weight()
    return all_gather_uneven(layer.merged_weight(), list(layer.sharding.sizes), span.dim, layer.sharding.group)
