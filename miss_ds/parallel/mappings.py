"""The tensor-parallel communication ops MiSS needs, as autograd functions.

``copy_to_tp``: identity forward, all-reduce of the gradient backward. Used on the input of a column-parallel
layer (every rank reads the whole input, so its gradient is summed) and on a D that is replicated in the TP
group (every rank computes part of its gradient).
``reduce_from_tp``: all-reduce forward, identity backward. The output of a row-parallel layer (what follows is
computed alike on every rank).
``sum_over_tp``: all-reduce forward and backward. A statistic summed over the ranks' shards and used by each rank
on its own shard (OLMo2's q/k norm over all heads): each rank's gradient holds only its shard's share.
All return at once when the group has a single rank. The all-reduces go through ``deepspeed.comm`` when it is
initialised (always, once DeepSpeed started the process group), so DeepSpeed's comms logger records them.
"""
from __future__ import annotations

from typing import Any, Optional

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def tp_world_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> None:
    """In-place sum over ``group``: through deepspeed.comm (logged) when it is up, else torch.distributed."""
    (ds_comm if ds_comm.is_initialized() else dist).all_reduce(x, group=group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        _all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        x = x.contiguous()
        _all_reduce(x, group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Identity forward; the gradient is summed over the TP group."""
    return x if tp_world_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum of the partial results over the TP group; the gradient passes through."""
    return x if tp_world_size(group) == 1 else _ReduceFromTP.apply(x, group)


def sum_over_tp(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum over the TP group, its gradient summed too (the sum feeds rank-local computations)."""
    if tp_world_size(group) == 1:
        return x
    # A copy, since the reduction sums in place: the forward of reduce_from_tp, the backward of copy_to_tp.
    return copy_to_tp(reduce_from_tp(x.clone(memory_format=torch.contiguous_format), group), group)
