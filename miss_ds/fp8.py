"""The frozen base in FP8 (e4m3): quantisation and the two products that read the base, as plain tensor functions.

The base never changes, so it is quantised once (:class:`FP8Weight`), in the two layouts its two GEMMs read:

- forward, ``y = x W^T``: W (out, in) row-major with one scale per output row;
- input gradient, ``dx = dy W``: W^T (in, out) contiguous with one scale per input column.

Each is passed to ``torch._scaled_mm`` transposed (a column-major view), the layout cuBLAS's FP8 GEMM takes for
its second operand. Together they hold 2 bytes per weight element, the bytes of one bf16 copy, plus fp32 scales.
Activations and output gradients change at every call: they are quantised per token (one scale per row) by
:func:`quantize_rows`. Every scale is ``amax / 448`` (e4m3's largest finite value), so a row's largest element maps
to 448; amax is clamped at ``AMAX_FLOOR`` so that an all-zero row (the gradient of an ignored token) quantises to
zeros. The products write bf16; accumulation is the GEMM's (fp32).

No modules, no process groups: a tensor-parallel shard is quantised from its own values, so a column-parallel
shard's row scales are the full weight's, its column scales its own rows' (and the other way round for a
row-parallel shard). TP=1 and TP=2 FP8 runs therefore differ by quantisation, not only by summation order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

E4M3 = torch.float8_e4m3fn
#: e4m3's largest finite value: a row's amax is scaled to it.
E4M3_MAX = torch.finfo(E4M3).max
#: Smallest amax a scale is computed from: an all-zero row gets a finite scale and quantises to zeros.
AMAX_FLOOR = 1e-12
#: FP8 GEMMs (cuBLAS, ``torch._scaled_mm``) need both dimensions of the weight to be multiples of this.
FP8_MULTIPLE = 16


def fp8_capable(in_features: float, out_features: float) -> bool:
    """Whether a weight (shard) of this shape can run on FP8 GEMMs: both dimensions multiples of 16 (the forward
    GEMM reduces over in and writes out, the input-gradient GEMM the other way round)."""
    return in_features % FP8_MULTIPLE == 0 and out_features % FP8_MULTIPLE == 0


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` (rows, n) as e4m3 values q (rows, n, contiguous) and fp32 scales s (rows, 1), t ~ q * s."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp_min(AMAX_FLOOR) / E4M3_MAX
    return (t.float() / scale).to(E4M3).contiguous(), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * s in fp32 (tests and references; the GEMMs never dequantise)."""
    return q.float() * scale


@dataclass(frozen=True, eq=False)
class FP8Weight:
    """A frozen weight W (out, in) in e4m3, in the layouts of its two GEMMs, built once by :meth:`from_weight`."""

    forward: torch.Tensor
    """(out, in) e4m3: W[o, :] ~ forward[o, :] * row_scale[0, o]."""
    row_scale: torch.Tensor
    """(1, out) fp32."""
    backward: torch.Tensor
    """(in, out) e4m3, contiguous (W^T): W[:, i] ~ backward[i, :] * col_scale[0, i]."""
    col_scale: torch.Tensor
    """(1, in) fp32."""

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor) -> FP8Weight:
        """Quantise ``weight`` (out, in): per output row for the forward GEMM, per input column for the input
        gradient's (temporaries: one fp32 copy of the weight at a time)."""
        forward, row_scale = quantize_rows(weight)
        backward, col_scale = quantize_rows(weight.t())
        return cls(forward, row_scale.t().contiguous(), backward, col_scale.t().contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in), the shape of the weight it stands for."""
        return tuple(self.forward.shape)

    @property
    def device(self) -> torch.device:
        return self.forward.device

    @property
    def nbytes(self) -> int:
        """Bytes held: 1 per element per layout, 4 per scale."""
        return sum(t.numel() * t.element_size() for t in (self.forward, self.row_scale, self.backward, self.col_scale))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight each GEMM multiplies by, (out, in) fp32: the forward layout's and the input gradient's."""
        return (dequantize_rows(self.forward, self.row_scale.t()),
                dequantize_rows(self.backward, self.col_scale.t()).t())


def linear_fp8(xq: torch.Tensor, x_scale: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    """x W^T (rows, out) in bf16 from a per-token quantised x (rows, in)."""
    return torch._scaled_mm(xq, weight.forward.t(), scale_a=x_scale, scale_b=weight.row_scale,
                            out_dtype=torch.bfloat16)


def input_grad_fp8(dq: torch.Tensor, dy_scale: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    """dy W (rows, in) in bf16 from a per-token quantised dy (rows, out)."""
    return torch._scaled_mm(dq, weight.backward.t(), scale_a=dy_scale, scale_b=weight.col_scale,
                            out_dtype=torch.bfloat16)


class _FrozenLinearFP8(torch.autograd.Function):
    """``x W^T`` for an FP8 base alone (a layer whose MiSS input differs from its base input: dropout): FP8 GEMMs
    in forward and for the input gradient, no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
        ctx.weight = weight  # frozen, never written: kept as it is
        x2 = x.reshape(-1, x.shape[-1])
        return linear_fp8(*quantize_rows(x2), weight).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[Optional[torch.Tensor], None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = input_grad_fp8(*quantize_rows(dy2), ctx.weight)
        return dx.reshape(*dy.shape[:-1], ctx.weight.shape[1]), None


def frozen_linear_fp8(x: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    """x W^T for an FP8 base, differentiable in x, in bf16."""
    return _FrozenLinearFP8.apply(x, weight)
