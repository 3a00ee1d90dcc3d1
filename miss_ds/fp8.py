"""The frozen base in FP8 (e4m3): quantisation and the two products that read the base, as plain tensor functions.

The base never changes, so it is quantised once (:class:`FP8Weight`): W (out, in) row-major, one fp32 scale per
output row, 1 byte per element. Both products read that one copy:

- forward, ``y = x W^T``: ``torch._scaled_mm(x_q, W_q^T)`` with x's per-token scales and W's per-row scales;
- input gradient, ``dx = dy W = (dy diag(s_W)) W_q``: W's row scales sit on the reduced dimension, where a
  row-wise scaled GEMM has no scale, so they are folded into dy before dy is quantised per token, and the GEMM
  reads the transpose of W_q, made for the call (FP8 tensor cores take both operands reduced-dimension-contiguous:
  one transient copy of one projection, a memory pass that costs a few percent of its GEMM).

A second, transposed copy kept for the input gradient would skip that pass at the price of a second byte per
element: the 80-layer Llama-2-70B shape (68 GB of FP8 projections) would no longer fit on one 141 GB GPU with its
optimizer state and activations, so one copy it is.

Activations and output gradients change at every call: they are quantised per token (one scale per row) by
:func:`quantize_rows`, on CUDA by a Triton kernel (``miss_ds.fp8_kernels``), elsewhere by its eager definition
:func:`quantize_rows_eager`. Every scale is ``amax / 448`` (e4m3's largest finite value), so a row's largest element
maps to 448; amax is clamped at ``AMAX_FLOOR`` so that an all-zero row (the gradient of an ignored token) quantises
to zeros. The products write bf16; accumulation is the GEMM's (fp32).

No modules, no process groups: a tensor-parallel shard is quantised from its own values. A column-parallel shard's
row scales are the full weight's, a row-parallel shard's are its own columns' maxima, and dy's per-token scales span
a column shard's outputs only, so TP=1 and TP=2 FP8 runs differ by quantisation, not only by summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
#: e4m3's largest finite value: a row's amax is scaled to it.
E4M3_MAX = torch.finfo(E4M3).max
#: Smallest amax a scale is computed from: an all-zero row gets a finite scale and quantises to zeros. Far below
#: any gradient an fp32 scale meets (output gradients times weight row scales reach 1e-12 deep in a model).
AMAX_FLOOR = 1e-30
#: FP8 GEMMs (cuBLAS, ``torch._scaled_mm``) need both dimensions of the weight to be multiples of this.
FP8_MULTIPLE = 16


def fp8_capable(in_features: float, out_features: float) -> bool:
    """Whether a weight (shard) of this shape can run on FP8 GEMMs: both dimensions multiples of 16 (the forward
    GEMM reduces over in and writes out, the input-gradient GEMM the other way round)."""
    return in_features % FP8_MULTIPLE == 0 and out_features % FP8_MULTIPLE == 0


def quantize_rows_eager(t: torch.Tensor, col_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` in eager PyTorch: its definition and the path off CUDA."""
    t = t.float() if col_scale is None else t.float() * col_scale
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_FLOOR) / E4M3_MAX
    return (t / scale).to(E4M3), scale


def quantize_rows(t: torch.Tensor, col_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``t * col_scale`` (rows, n; col_scale (1, n) or None) as e4m3 values q (rows, n, contiguous) and fp32
    scales s (rows, 1): t * col_scale ~ q * s. On CUDA a Triton kernel (``fp8_kernels``)."""
    t = t.contiguous()
    if t.is_cuda:
        from . import fp8_kernels

        return fp8_kernels.quantize_rows(t, col_scale, E4M3, AMAX_FLOOR, E4M3_MAX)
    return quantize_rows_eager(t, col_scale)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """``t`` (a, b) as a contiguous (b, a) copy; on CUDA in tiles (``fp8_kernels``, as bytes: e4m3 copies the
    same)."""
    if not t.is_cuda:
        return t.t().contiguous()
    from . import fp8_kernels

    return fp8_kernels.transposed(t.contiguous().view(torch.uint8)).view(t.dtype)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * s in fp32 (tests and references; the GEMMs never dequantise)."""
    return q.float() * scale


@dataclass(frozen=True, eq=False)
class FP8Weight:
    """A frozen weight W (out, in) in e4m3 with one scale per output row, built once by :meth:`from_weight`."""

    data: torch.Tensor
    """(out, in) e4m3: W[o, :] ~ data[o, :] * scale[0, o]."""
    scale: torch.Tensor
    """(1, out) fp32."""
    unit: torch.Tensor
    """(1, in) fp32 ones: the input-gradient GEMM's column scales (W's scales are folded into dy)."""

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor) -> FP8Weight:
        """Quantise ``weight`` (out, in) per output row."""
        data, scale = quantize_rows(weight)
        return cls(data, scale.t().contiguous(),
                   torch.ones(1, weight.shape[1], dtype=torch.float32, device=weight.device))

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), the shape of the weight it stands for."""
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: 1 per element, 4 per scale (and per unit column scale)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.unit))

    def dequantized(self) -> torch.Tensor:
        """The weight both GEMMs multiply by, (out, in) fp32 (tests and references, as :func:`dequantize_rows`)."""
        return dequantize_rows(self.data, self.scale.t())


def linear_fp8(x2: torch.Tensor, weight: FP8Weight,
               quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """x W^T (rows, out) in bf16 for x (rows, in); ``quantized``: x's per-token quantisation, if already made.
    Both FP8 GEMMs use Hopper's fast accumulation (no periodic promotion of the partial sums to fp32): 2-7% faster
    on the 70B shapes, 0.26-0.46% error over the quantised operands against 0.17% without, beside quantisation's
    3.6% (``bench.py layer --base-precision fp8`` prints both)."""
    xq, x_scale = quantized if quantized is not None else quantize_rows(x2)
    return torch._scaled_mm(xq, weight.data.t(), scale_a=x_scale, scale_b=weight.scale, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def input_grad_fp8(dy2: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    """dy W (rows, in) in bf16 for dy (rows, out): (dy diag(s_W)) quantised per token, times W_q."""
    dq, dy_scale = quantize_rows(dy2, weight.scale)
    return torch._scaled_mm(dq, transposed(weight.data).t(), scale_a=dy_scale, scale_b=weight.unit,
                            out_dtype=torch.bfloat16, use_fast_accum=True)


class _FrozenLinearFP8(torch.autograd.Function):
    """``x W^T`` for an FP8 base alone (a layer whose MiSS input differs from its base input: dropout): FP8 GEMMs
    in forward and for the input gradient, no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
        ctx.weight = weight  # frozen, never written: kept as it is
        return linear_fp8(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        dx = input_grad_fp8(dy.reshape(-1, dy.shape[-1]), ctx.weight)
        return dx.reshape(*dy.shape[:-1], ctx.weight.shape[1]), None


def frozen_linear_fp8(x: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    """x W^T for an FP8 base, differentiable in x, in bf16."""
    return _FrozenLinearFP8.apply(x, weight)
