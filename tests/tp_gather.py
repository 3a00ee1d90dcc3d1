"""Test helper: reassemble full tensors from the TP shards of a live MiSS layer (the references compare whole tensors)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from miss_ds.layers import MissLayer, Split
from miss_ds.parallel.mappings import tp_world_size


def all_gather_uneven(shard: torch.Tensor, sizes: list[int], dim: int, group) -> list[torch.Tensor]:
    """Every rank's shard along ``dim``, in rank order; shards may differ in size (``sizes``, in rank order)."""
    if tp_world_size(group) == 1:
        return [shard]
    padded_shape = list(shard.shape)
    padded_shape[dim] = max(sizes)
    padded = shard.new_zeros(padded_shape)
    padded.narrow(dim, 0, shard.shape[dim]).copy_(shard)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p.narrow(dim, 0, n) for p, n in zip(parts, sizes)]


def gather_split(shard: torch.Tensor, split: Split, dim: int, group) -> torch.Tensor:
    """The full tensor of which every rank holds its ``split`` shard along ``dim`` (fused parts included)."""
    shards = all_gather_uneven(shard, list(split.sizes), dim, group)
    return shards[0] if len(shards) == 1 else split.join(shards, dim)


@torch.no_grad()
def full_d(layer: MissLayer) -> torch.Tensor:
    """The whole D of a layer (a copy of the local one when D is replicated)."""
    layout = layer.d_layout
    if layout.replicated:
        return layer.miss_block.detach().clone()
    return gather_split(layer.miss_block.detach(), layout.split, layout.dim, layer.sharding.group)


@torch.no_grad()
def full_merged_weight(layer: MissLayer) -> torch.Tensor:
    """The whole merged weight W' of a (possibly tensor-parallel) MiSS layer."""
    span = layer.sharding.span("weight")
    if span is None:
        return layer.merged_weight()
    return gather_split(layer.merged_weight(), layer.sharding.split, span.dim, layer.sharding.group)
