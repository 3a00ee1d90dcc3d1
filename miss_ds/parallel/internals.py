"""Model code that reads full widths, made right for one tensor-parallel rank.

Splitting the projections is not always enough: some model code uses full widths itself. :func:`localize` fixes
what the family record (:mod:`miss_ds.families`) says a model has, so the model at TP=N computes what it computes
on one device:

- ``heads_from_config`` (Phi-3): the attention slices q, k and v out of its fused projection by the config's head
  counts; it gets a view of the config with this rank's counts (:class:`LocalHeadsConfig`).
- ``full_width_norms`` (OLMo2): q_norm and k_norm normalise a projection's whole output, all heads at once; each
  becomes a :class:`ShardedRMSNorm`, its weight split as the projection's output and its mean square summed over
  the TP group.
- ``experts`` (MoE): the routed experts' fused 3-D weights are split as a gated MLP is (gate and up along their
  out, each part alone; down along its in) and their output is summed over the TP group (:func:`split_experts`).

A module holding split parameters other than a linear's says where its shards sit in ``tp_spans`` (parameter name
-> :class:`~miss_ds.layers.Span`), which the per-rank loader reads.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.distributed import ProcessGroup

from .. import ds_compat
from ..families import Family
from ..layers import Sharding, Span, Split
from .mappings import copy_to_tp, reduce_from_tp, sum_over_tp, tp_world_size


class LocalHeadsConfig:
    """The model config as one TP rank's attention sees it: its own head counts, everything else the model's."""

    def __init__(self, config: Any, heads: int, kv_heads: int) -> None:
        self.__dict__.update(_config=config, num_attention_heads=heads, num_key_value_heads=kv_heads)

    def __getattr__(self, name: str) -> Any:
        if name == "_config" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._config, name)


class ShardedRMSNorm(nn.Module):
    """An RMSNorm over a whole projection output (``weight * x / rms(x)``, OLMo2's q/k norm) of which this rank
    holds the features ``sharding`` says: its weight is cut the same way and the sum of squares is summed over the
    TP group, so every feature is normalised by the full projection's mean square."""

    def __init__(self, norm: nn.Module, sharding: Sharding) -> None:
        super().__init__()
        self.sharding, self.eps = sharding, norm.variance_epsilon
        self.weight = nn.Parameter(sharding.split.take(norm.weight.detach(), 0, sharding.rank).clone(),
                                   requires_grad=norm.weight.requires_grad)

    @property
    def tp_spans(self) -> dict[str, Optional[Span]]:
        return {"weight": self.sharding.span("weight")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        square_sum = sum_over_tp(x.pow(2).sum(-1, keepdim=True), self.sharding.group)
        x = x * torch.rsqrt(square_sum / self.sharding.split.full + self.eps)
        return (self.weight * x).to(dtype)


def split_experts(experts: nn.Module, name: str, family: Family, config: Any, group: ProcessGroup,
                  tp_meta: Any) -> None:
    """Keep this rank's shard of routed experts' ``gate_up_proj`` (experts, 2 x inter, hidden) and ``down_proj``
    (experts, hidden, inter): the inter features DeepSpeed would give it of a gated MLP of that width, in gate and
    in up. Each expert then computes a partial output on its inter shard (the model's chunk(2) still finds gate and
    up); hooks sum it over the group and sum the gradients of the inputs (hidden states and routing weights)."""
    rank, tp = torch.distributed.get_rank(group), tp_world_size(group)
    inter = getattr(config, family.experts.intermediate)
    sizes = ds_compat.autotp_shard_sizes(inter, tp, tp_meta, f"{name}.gate_up_proj")
    splits = {"gate_up_proj": (1, Split((tuple(sizes), tuple(sizes)))), "down_proj": (2, Split.contiguous(sizes))}
    spans = {}
    for param, (dim, split) in splits.items():
        full = getattr(experts, param)
        setattr(experts, param, nn.Parameter(split.take(full.detach(), dim, rank).clone(),
                                             requires_grad=full.requires_grad))
        spans[param] = Span(dim, split.ranges(rank), split.full)
    experts.tp_spans = spans
    experts.register_forward_pre_hook(_experts_inputs(group), with_kwargs=True)
    experts.register_forward_hook(lambda module, args, output: reduce_from_tp(output, group))


def _experts_inputs(group: ProcessGroup):
    """A pre-hook on ``experts(hidden_states, top_k_index, top_k_weights)`` that sums the gradients of the hidden
    states and of the routing weights over the TP group (each rank's share comes from its inter shard)."""
    names = ("hidden_states", "top_k_index", "top_k_weights")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = list(args)
        for i, key in enumerate(names):
            if key == "top_k_index":
                continue
            if i < len(args):
                args[i] = copy_to_tp(args[i], group)
            elif key in kwargs:
                kwargs[key] = copy_to_tp(kwargs[key], group)
        return tuple(args), kwargs
    return hook


def localize(model: nn.Module, family: Family, group: ProcessGroup, tp_meta: Any,
             sharding_of: Callable[[nn.Module], Optional[Sharding]]) -> None:
    """Apply the fixes of the module docstring that ``family`` needs to a model whose projections are split
    (``sharding_of``: how the TP engine split a projection)."""
    config = model.config
    for name, module in list(model.named_modules()):
        if family.heads_from_config and hasattr(module, "qkv_proj") and hasattr(module, "head_dim"):
            sharding = sharding_of(module.qkv_proj)
            q, k = (part[sharding.rank] for part in sharding.split.parts[:2])
            heads, kv = q // module.head_dim, k // module.head_dim
            module.config = LocalHeadsConfig(config, heads, kv)
            module.num_key_value_heads = kv
        for norm, projection in family.full_width_norms.items():
            if isinstance(getattr(module, norm, None), nn.Module) and hasattr(module, projection):
                setattr(module, norm, ShardedRMSNorm(getattr(module, norm), sharding_of(getattr(module, projection))))
        if family.experts is not None and name.rpartition(".")[2] == "experts" and hasattr(module, "gate_up_proj"):
            split_experts(module, name, family, config, group, tp_meta)

