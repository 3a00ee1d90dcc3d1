"""Fused GPU kernels for MiSS's ``miss`` and ``mini`` modes, with the plain PyTorch path as the fallback.

The additive form y = x W^T + agg(x) D costs, in plain PyTorch, a pass over the output to add the delta and, in
backward, a pass over the input gradient to add the chunk broadcast of dy D^T. Each pass moves as many bytes as
the frozen GEMM's own output, so they, not the r/in extra FLOPs, set MiSS's overhead. The Triton GEMMs here fold
both into the frozen GEMM: the delta is one more K step (agg tile times D tile) before the epilogue, and the
broadcast is a gathered add in the input-gradient GEMM's epilogue.

:func:`enabled` says whether a tensor takes the fused path: a CUDA tensor in bf16/fp16, Triton importable, and
the kernels switched on (``MISS_DS_KERNELS=1`` or :func:`use`). They are off by default: so far they are checked
under Triton's interpreter only, not yet timed or run on a GPU (docs/performance.md). Everything else (CPU,
fp32, kernels off) takes the PyTorch path.
Tests run the kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported).
"""
from __future__ import annotations

import importlib.util
import os

import torch

_FUSED_DTYPES = (torch.bfloat16, torch.float16)
_switch = os.environ.get("MISS_DS_KERNELS") == "1"
_triton = importlib.util.find_spec("triton") is not None


def use(on: bool) -> None:
    """Switch the fused kernels on or off for this process (benchmarks compare both paths in one run)."""
    global _switch
    _switch = on


def enabled(x: torch.Tensor) -> bool:
    """Whether MiSS layers computing on ``x`` take the fused kernels."""
    return _switch and _triton and x.is_cuda and x.dtype in _FUSED_DTYPES


def miss_forward(x: torch.Tensor, w: torch.Tensor, agg: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T + agg (M, r) @ d (r, N) in one GEMM; all in x's dtype."""
    from .linear import fused_forward

    return fused_forward(x, w, agg, d)


def miss_input_grad(dy: torch.Tensor, w: torch.Tensor, g: torch.Tensor, in_offset: int) -> torch.Tensor:
    """dy (M, N) @ w (N, K) with g[m, (in_offset + k) mod r] added to column k: MiSS's input gradient."""
    from .linear import fused_input_grad

    return fused_input_grad(dy, w, g, in_offset)
