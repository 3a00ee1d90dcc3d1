"""MiSS math as plain functions of tensors: no modules, no process groups.

Every function works on one shard of a linear layer. ``MissGeometry.in_offset`` / ``out_offset`` give the
global index of the shard's first input / output feature, so the tensor-parallel layers call exactly the
same code as the single-device layer (TP=1 is the special case of zero offsets).

Notation: W is (out, in), x is (..., in), y = x W^T + delta. Global input feature c belongs to chunk
position c mod r.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels


class MissShapeError(ValueError):
    """A layer's shape (or its tensor-parallel shard) cannot carry the requested MiSS mode."""


@dataclass(frozen=True)
class MissGeometry:
    """Shape of one MiSS shard: the mode, r, and where the local weight sits in the full weight."""

    mode: str
    r: int
    mini_r: int
    in_features: int
    out_features: int
    in_offset: int = 0
    out_offset: int = 0

    @property
    def d_shape(self) -> tuple[int, ...]:
        """Shape of the local D."""
        if self.mode == "miss":
            return (self.r, self.out_features)
        if self.mode == "mini":
            return (self.r, self.mini_r)
        return (self.out_features // self.r, self.r, self.r)


def check_layer(name: str, mode: str, r: int, mini_r: int, in_features: int, out_features: int) -> None:
    """Raise ``MissShapeError`` naming the module, its shape and a value that fits, if the mode can't apply."""
    where = f"module '{name}' (in_features={in_features}, out_features={out_features})"
    if r > in_features:
        raise MissShapeError(f"miss.r={r} is larger than in_features of {where}; use r <= {in_features}")
    if mode == "bat" and (in_features % r or out_features % r):
        fit = _largest_divisor_at_most(math.gcd(in_features, out_features), r)
        raise MissShapeError(
            f"miss.mode='bat' needs in_features and out_features divisible by r={r} in {where}; "
            f"r={fit} fits (or exclude this module)")
    if mode == "mini" and out_features % mini_r:
        fit = _largest_divisor_at_most(out_features, mini_r)
        raise MissShapeError(
            f"miss.mode='mini' needs out_features divisible by mini_r={mini_r} in {where}; mini_r={fit} fits")


def _largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


def init_d(geometry: MissGeometry, zeros: bool, dtype: torch.dtype, device: torch.device | str | None = None
           ) -> torch.Tensor:
    """A new local D: zeros (the adapted layer equals the base), or random (PEFT's kaiming-uniform)."""
    d = torch.zeros(geometry.d_shape, dtype=dtype, device=device)
    if not zeros:
        torch.nn.init.kaiming_uniform_(d, a=math.sqrt(5))
    return d


def aggregate(x: torch.Tensor, r: int, in_offset: int = 0) -> torch.Tensor:
    """Sum x over its chunks of r features: (..., n) -> (..., r), position j collecting features c = j mod r.

    ``in_offset`` is the global index of x's first feature (a row-parallel shard), so the local sums of all
    shards add up to the aggregation of the full input. The sum accumulates in fp32 for low-precision x.
    """
    lead = in_offset % r
    tail = (-(lead + x.shape[-1])) % r
    if lead or tail:
        x = F.pad(x, (lead, tail))
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return x.reshape(*x.shape[:-1], -1, r).sum(dim=-2, dtype=acc).to(x.dtype)


def expand_d(d: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """D as an (r, local out) matrix: itself for ``miss``; ``mini``'s (r, mini_r) tiled along out from out_offset."""
    if g.mode == "miss":
        return d
    if g.mode == "mini":
        start = g.out_offset % g.mini_r
        reps = -(-(start + g.out_features) // g.mini_r)
        return d.repeat(1, reps)[:, start:start + g.out_features]
    raise ValueError("expand_d applies to 'miss' and 'mini'; 'bat' D is blockwise")


def delta_weight(w: torch.Tensor, d: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """The update MiSS makes to the local weight, in D's dtype: W' = W + delta_weight."""
    if g.mode == "bat":
        return _bat_delta_weight(w.to(d.dtype), d, g.r)
    cols = (torch.arange(g.in_features, device=d.device) + g.in_offset) % g.r
    return expand_d(d, g)[cols].T


def merge(w: torch.Tensor, d: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """The merged weight W' in W's dtype (computed in D's precision)."""
    return (w.to(d.dtype) + delta_weight(w, d, g)).to(w.dtype)


def unmerge(w_merged: torch.Tensor, d: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """Invert ``merge``. ``bat`` solves W = (W' - D_a)(I + D_a)^-1 block by block; the others subtract."""
    if g.mode != "bat":
        return (w_merged.to(d.dtype) - delta_weight(w_merged, d, g)).to(w_merged.dtype)
    r = g.r
    blocks = _blocks(w_merged.to(torch.float64), r) - d.to(torch.float64)[:, :, None, :]
    eye = torch.eye(r, dtype=torch.float64, device=d.device)
    inv = torch.linalg.inv(eye + d.to(torch.float64))  # (out/r, r, r)
    restored = torch.einsum("aibj,ajk->aibk", blocks, inv)
    return restored.reshape(w_merged.shape).to(w_merged.dtype)


def _blocks(w: torch.Tensor, r: int) -> torch.Tensor:
    """View W (out, in) as r x r blocks indexed [a, i, b, j]: block (a, b) is W[a*r+i, b*r+j]."""
    return w.reshape(w.shape[0] // r, r, w.shape[1] // r, r)


def _bat_delta_weight(w: torch.Tensor, d: torch.Tensor, r: int) -> torch.Tensor:
    """Bone's block update W_ab @ D_a + D_a for every block, as one batched product."""
    blocks = _blocks(w, r)
    return (torch.einsum("aibj,ajk->aibk", blocks, d) + d[:, :, None, :]).reshape(w.shape)


def broadcast_chunks(g: torch.Tensor, n: int, r: int, in_offset: int = 0) -> torch.Tensor:
    """The adjoint of ``aggregate``: (..., r) -> (..., n) with feature c taking g[..., (in_offset + c) mod r]."""
    lead = in_offset % r
    reps = -(-(lead + n) // r)
    return g.repeat(*([1] * (g.dim() - 1)), reps)[..., lead:lead + n]


class _AdditiveMissLinear(torch.autograd.Function):
    """``x W^T + agg(x) @ D`` as one autograd node (``miss``/``mini``), built to move few bytes.

    Forward: on GPU (bf16/fp16) one Triton GEMM with agg(x) @ D as its last K step (:mod:`miss_ds.kernels`);
    otherwise the small GEMM writes the delta and the frozen GEMM accumulates onto it (beta=1). Only agg(x) is
    saved (r values a token), not x. Backward: the MiSS input gradient g = dy D^T, spread over the input chunks,
    is added in the input-gradient GEMM's epilogue (on GPU) or written first for that GEMM to accumulate onto;
    D's gradient is agg(x)^T dy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, r: int, in_offset: int) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        agg = aggregate(x2, r, in_offset)
        if kernels.enabled(x2) and w.dtype == x.dtype:
            out = kernels.miss_forward(x2, w, agg, d.to(x.dtype))
        else:
            out = agg @ d.to(x.dtype)
            out.addmm_(x2, w.t())
        ctx.save_for_backward(agg, w, d)
        ctx.r, ctx.in_offset = r, in_offset
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        agg, w, d = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dd = None
        if ctx.needs_input_grad[0]:
            g = dy2 @ d.to(dy.dtype).t()
            if kernels.enabled(dy2) and w.dtype == dy.dtype:
                dx = kernels.miss_input_grad(dy2, w, g, ctx.in_offset)
            else:
                dx = broadcast_chunks(g, w.shape[1], ctx.r, ctx.in_offset).contiguous()
                dx.addmm_(dy2, w)
            dx = dx.reshape(*dy.shape[:-1], w.shape[1])
        if ctx.needs_input_grad[2]:
            dd = (agg.t() @ dy2).to(d.dtype)
        return dx, None, dd, None, None


def adapted_linear(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, g: MissGeometry,
                   dropout: torch.nn.Module | None = None) -> torch.Tensor:
    """x W'^T for the local shard, without bias: the base product plus MiSS, computed in x's dtype.

    ``miss``/``mini`` add agg(x) @ D to the frozen product (D is cast to x's dtype, its gradient flows back
    in D's own dtype); ``bat`` multiplies by the merged weight, since its update depends on W.
    """
    if g.mode == "bat":
        return F.linear(x, merge(w, d, g).to(x.dtype))
    if dropout is not None and dropout.training and dropout.p > 0:
        return F.linear(x, w) + aggregate(dropout(x), g.r, g.in_offset) @ expand_d(d, g).to(x.dtype)
    return _AdditiveMissLinear.apply(x, w, expand_d(d, g), g.r, g.in_offset)
