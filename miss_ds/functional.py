"""MiSS math as plain functions of tensors: no modules, no process groups.

Every function works on one shard of a linear layer. ``MissGeometry.in_offset`` / ``out_offset`` give the
global index of the shard's first input / output feature, so the tensor-parallel layers call exactly the
same code as the single-device layer (TP=1 is the special case of zero offsets).

Notation: W is (out, in), x is (..., in), y = x W^T + delta. Global input feature c belongs to chunk
position c mod r. The frozen W ("base") is a tensor, or, with ``model.base_precision: fp8``, an
:class:`miss_ds.fp8.FP8Weight`: then the products that read it run on FP8 GEMMs, and D and its math stay as they are.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import fp8, recompute

#: A frozen weight as a MiSS product reads it: a tensor, or its FP8 copy.
Base = Union[torch.Tensor, fp8.FP8Weight]

#: Why ``bat`` refuses an FP8 base (:func:`adapted_linear`); the quantiser and ``MissLayer.to_fp8`` refuse with it.
BAT_FP8_REFUSAL = ("miss.mode='bat' multiplies by the merged weight, which changes every step: it cannot read an "
                   "FP8 base (use model.base_precision: bf16)")


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


@functools.lru_cache(maxsize=256)
def chunk_matrix(r: int, n: int, in_offset: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """E (r, n): E[j, c] = 1 iff (in_offset + c) mod r == j. ``x @ E^T`` is MiSS's aggregation of x (its chunk sums,
    zero-padded), ``g @ E`` spreads g back over the chunks, and D^T E is the update to W (an exact rank-r LoRA).

    Both products run as cuBLAS GEMMs (K = n or K = r): at memory bandwidth, with no padded copy of x for a ragged
    or offset shard. Cached: a layer asks for the same matrix at every call (r x n values, read-only).
    """
    return (torch.arange(in_offset, in_offset + n, device=device) % r == torch.arange(r, device=device)[:, None]
            ).to(dtype)


def aggregate(x: torch.Tensor, r: int, in_offset: int = 0) -> torch.Tensor:
    """Sum x over its chunks of r features: (..., n) -> (..., r), position j collecting features c = j mod r.

    ``in_offset`` is the global index of x's first feature (a row-parallel shard), so the local sums of all
    shards add up to the aggregation of the full input. A GEMM with the 0/1 chunk matrix: it accumulates in fp32
    for low-precision x.
    """
    return x @ chunk_matrix(r, x.shape[-1], in_offset, x.dtype, x.device).t()


def spread(g: torch.Tensor, n: int, r: int, in_offset: int = 0) -> torch.Tensor:
    """The adjoint of :func:`aggregate`: (..., r) -> (..., n), feature c taking g[..., (in_offset + c) mod r]."""
    return g @ chunk_matrix(r, n, in_offset, g.dtype, g.device)


def can_share_input(geometries: Sequence[MissGeometry]) -> bool:
    """Whether these shards can run as one shared-input node (:func:`shared_input_products`): ``miss``/``mini``,
    one r, one input shard (features and global offset)."""
    first = geometries[0]
    return all(g.mode != "bat" and (g.r, g.in_features, g.in_offset) == (first.r, first.in_features, first.in_offset)
               for g in geometries)


def expand_d(d: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """D as an (r, local out) matrix: itself for ``miss``; ``mini``'s (r, mini_r) tiled along out from out_offset."""
    if g.mode == "miss":
        return d
    if g.mode == "mini":
        start = g.out_offset % g.mini_r
        reps = -(-(start + g.out_features) // g.mini_r)
        return d.repeat(1, reps)[:, start:start + g.out_features]
    raise ValueError("expand_d applies to 'miss' and 'mini'; 'bat' D is blockwise")


def fold_d_grad(grad: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """The adjoint of :func:`expand_d`: the gradient of the (r, local out) matrix folded back onto D's shape
    (``mini``: the columns that share a column of D summed)."""
    if g.mode == "miss":
        return grad
    start = g.out_offset % g.mini_r
    pads = (start, -(start + g.out_features) % g.mini_r)
    return (F.pad(grad, pads) if any(pads) else grad).view(grad.shape[0], -1, g.mini_r).sum(1)


def delta_weight(w: torch.Tensor, d: torch.Tensor, g: MissGeometry) -> torch.Tensor:
    """The update MiSS makes to the local weight, in D's dtype: W' = W + delta_weight."""
    if g.mode == "bat":
        return _bat_delta_weight(w.to(d.dtype), d, g.r)
    return expand_d(d, g).t() @ chunk_matrix(g.r, g.in_features, g.in_offset, d.dtype, d.device)


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


def bat_merged_weight(w: torch.Tensor, d: torch.Tensor, r: int) -> torch.Tensor:
    """Bone's merged weight W_ab + W_ab D_a + D_a, in w's dtype, for the forward of a training step (W frozen)."""
    return _BatMergedWeight.apply(w, d, r)


class _BatMergedWeight(torch.autograd.Function):
    """W' = W + delta_weight(W, D) in five passes over W's bytes instead of seven: one elementwise kernel writes
    W_ab + D_a, and one batched GEMM adds the block products W_ab D_a onto it in its epilogue (beta=1, accumulated
    in fp32 before the one rounding). Backward reads dW' twice (D's gradient sum_b W_ab^T dW'_ab + dW'_ab); as
    autograd of the same ops it would also copy dW' (the GEMM writes into a view of the add's output)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, d: torch.Tensor, r: int) -> torch.Tensor:
        out_features, in_features = w.shape
        rows = (out_features // r, in_features, r)  # block row a: its r rows of W side by side, (i, b) by j
        merged = (_blocks(w, r) + d[:, :, None, :]).view(rows)
        merged.baddbmm_(w.reshape(rows), d)
        ctx.save_for_backward(w)
        ctx.r = r
        return merged.view(out_features, in_features)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        if ctx.needs_input_grad[0]:
            raise RuntimeError("bat_merged_weight gives no gradient for W: W must be frozen")
        (w,) = ctx.saved_tensors
        r = ctx.r
        rows = (w.shape[0] // r, w.shape[1], r)
        grad_d = torch.bmm(w.reshape(rows).transpose(1, 2), grad.reshape(rows))
        return None, grad_d.add_(_blocks(grad, r).sum(2)), None


class _SharedInputMiss(torch.autograd.Function):
    """``y_p = x W_p^T + agg(x) @ D_p`` for one input x and the ``miss``/``mini`` projections p that read it (q, k
    and v; gate and up; or a single layer), as one autograd node, whose backward gives x's whole gradient.

    What it saves over one node per projection (all memory traffic, the FLOPs are r/in of the base's): agg(x) is
    computed once; in backward the MiSS input gradient sum_p dy_p D_p^T is spread over the chunks once, by a GEMM
    with the chunk matrix that writes dx, and every projection's dy_p W_p accumulates onto it in the cuBLAS
    epilogue (beta=1). That costs less than the floor's own sum of the projections' input gradients. Saved: agg(x)
    (r values a token), not x; a recomputed layer keeps it from its first forward (:mod:`miss_ds.recompute`). D
    arrives as the layer holds it: the node casts it to x's dtype and tiles ``mini``'s along out (:func:`expand_d`)
    once a forward, outside autograd, and its backward folds the gradient back once (:func:`fold_d_grad`).

    For a tensor base the node's forward returns the deltas agg(x) D_p only, and :func:`shared_input_products`
    accumulates the frozen products x W_p^T onto them (cuBLAS, beta=1) after the node, outside autograd (x
    detached: the node's backward already includes dy_p W_p). So the node's saved tensors are stored before the
    frozen GEMMs run, and when a recomputed layer (non-reentrant activation checkpointing) ends with a MiSS
    projection, as a Llama layer ends with down_proj, the recomputation stops before that projection's frozen GEMM,
    as it does for the frozen floor, whose GEMM saves nothing it needs: one frozen GEMM fewer per layer and step.

    FP8 bases (:class:`miss_ds.fp8.FP8Weight`: all of the node's projections or none) run the two products that
    read W on FP8 GEMMs, inside the node: x is quantised per token once for all the projections;
    ``torch._scaled_mm`` cannot accumulate onto an output, so it writes x W_p^T and the delta agg(x) D_p is added
    onto that; in backward each dy_p (times W_p's row scales) is quantised per token and its product dy_p W_p is
    added onto dx. agg(x), D's gradient agg^T dy_p and the MiSS input gradient stay in x's dtype (bf16), read from
    the unquantised x and dy.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, geometries: tuple[MissGeometry, ...], *bases_and_ds: Base | torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        r, in_offset = geometries[0].r, geometries[0].in_offset
        bases = bases_and_ds[0::2]
        # cast once (backward reuses the cast), then mini's tiled
        ds = [expand_d(d.to(x.dtype), g) for d, g in zip(bases_and_ds[1::2], geometries)]
        x2 = x.reshape(-1, x.shape[-1])
        agg = recompute.kept(lambda: aggregate(x2, r, in_offset), ("aggregate", x2.shape, x2.dtype, r, in_offset))
        on_fp8 = isinstance(bases[0], fp8.FP8Weight)
        xq = fp8.quantize_rows(x2) if on_fp8 else None  # one quantisation of x for every projection
        outs = []
        for base, d in zip(bases, ds):
            if on_fp8:
                out = fp8.linear_fp8(x2, base, xq)
                out.addmm_(agg, d)
            else:
                out = agg @ d  # (tokens, out): the frozen product accumulates onto it after the node
            outs.append(out)
        ctx.fp8_bases = bases if on_fp8 else None  # frozen, never written: kept as they are
        ctx.save_for_backward(agg, *ds, *(() if on_fp8 else bases))
        ctx.x_shape, ctx.geometries = x.shape, geometries
        ctx.d_dtypes = [d.dtype for d in bases_and_ds[1::2]]
        ctx.set_materialize_grads(False)  # an unused output (None gradient) costs nothing in backward
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: Optional[torch.Tensor]):
        agg, *tensors = ctx.saved_tensors
        count = len(dys)
        ds = tensors[:count]
        bases = ctx.fp8_bases if ctx.fp8_bases is not None else tensors[count:]
        grads: list[Optional[torch.Tensor]] = [None] * (2 + 2 * count)
        need_x = ctx.needs_input_grad[0]
        g, products = None, []
        for i, (dy, base, d) in enumerate(zip(dys, bases, ds)):
            if dy is None:
                continue
            dy2 = dy.reshape(-1, dy.shape[-1])
            products.append((dy2, base))
            if need_x:
                g = dy2 @ d.t() if g is None else g.addmm_(dy2, d.t())
            if ctx.needs_input_grad[3 + 2 * i]:
                grads[3 + 2 * i] = fold_d_grad((agg.t() @ dy2).to(ctx.d_dtypes[i]), ctx.geometries[i])
        if need_x and products:
            first = ctx.geometries[0]
            dx = spread(g, ctx.x_shape[-1], first.r, first.in_offset)
            for dy2, base in products:
                if ctx.fp8_bases is None:
                    dx.addmm_(dy2, base)
                else:
                    dx.add_(fp8.input_grad_fp8(dy2, base))
            grads[0] = dx.reshape(ctx.x_shape)
        return tuple(grads)


def shared_input_products(x: torch.Tensor, projections: Sequence[tuple[Base, torch.Tensor, MissGeometry]]
                          ) -> tuple[torch.Tensor, ...]:
    """x W_p'^T for ``miss``/``mini`` shards ``(W_p, D_p, geometry_p)`` that all read x (siblings such as q, k and
    v), without bias, in x's dtype, as one autograd node (:class:`_SharedInputMiss`). D is cast to x's dtype (and
    ``mini``'s tiled) inside the node; its gradient flows back in D's own dtype. The geometries must agree on r and
    the input (features, offset); the bases must all be tensors or all FP8 (then x must be bf16)."""
    geometries = [g for _, _, g in projections]
    if not can_share_input(geometries):
        raise ValueError(f"projections sharing an input need mode miss/mini and the same r and input shard; got "
                         f"{geometries}")
    on_fp8 = {isinstance(w, fp8.FP8Weight) for w, _, _ in projections}
    if len(on_fp8) > 1:
        raise ValueError("projections computed together need their frozen weights all in FP8 or none: compute "
                         "the others one by one")
    if on_fp8 == {True} and x.dtype != torch.bfloat16:
        raise ValueError(f"an FP8 base needs bf16 activations (model.dtype: bfloat16); got {x.dtype}")
    flat = [t for w, d, _ in projections for t in (w, d)]
    outs = _SharedInputMiss.apply(x, tuple(geometries), *flat)
    if on_fp8 == {False}:
        x2 = x.detach().reshape(-1, x.shape[-1])
        for out, (w, _, _) in zip(outs, projections):
            out.addmm_(x2, w.t())  # onto the node's delta (beta=1); its gradient is in the node's backward
    return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)


def frozen_product(x: torch.Tensor, w: Base) -> torch.Tensor:
    """x W^T for a frozen weight alone: ``F.linear``, or the FP8 GEMMs for an FP8 one."""
    return fp8.frozen_linear_fp8(x, w) if isinstance(w, fp8.FP8Weight) else F.linear(x, w)


def adapted_linear(x: torch.Tensor, w: Base, d: torch.Tensor, g: MissGeometry,
                   dropout: torch.nn.Module | None = None) -> torch.Tensor:
    """x W'^T for the local shard, without bias: the base product plus MiSS, computed in x's dtype.

    ``miss``/``mini`` add agg(x) @ D to the frozen product (:func:`shared_input_products` of one projection);
    with dropout active, agg reads the dropped-out x (PEFT's rule). ``bat`` multiplies by the merged weight,
    since its update depends on W, merged in x's dtype (cuBLAS accumulates its block products in fp32): an fp32
    merge would write and read fp32 copies of W, twice its bytes, in forward and again in backward. So ``bat``
    has no frozen product to run in FP8, and refuses an FP8 base.
    """
    if g.mode == "bat":
        if isinstance(w, fp8.FP8Weight):
            raise ValueError(BAT_FP8_REFUSAL)
        return F.linear(x, bat_merged_weight(w.to(x.dtype), d.to(x.dtype), g.r))
    if dropout is not None and dropout.training and dropout.p > 0:
        return frozen_product(x, w) + aggregate(dropout(x), g.r, g.in_offset) @ expand_d(d, g).to(x.dtype)
    return shared_input_products(x, [(w, d, g)])[0]
