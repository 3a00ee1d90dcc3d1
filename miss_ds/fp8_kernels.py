"""Two memory-bound passes of the FP8 base as Triton kernels (CUDA only; imported by :mod:`miss_ds.fp8` on first
CUDA use): the per-token quantiser and the weight transpose the input-gradient GEMM reads.

Written by hand because what PyTorch offers reads the data more than once: eager quantisation is six kernels,
``torch.compile`` (dynamic shapes) a reduction kernel that reads each row twice, and the eager and compiled
transposes copy at a third of the GPU's bandwidth (``tools/bench.py layer --base-precision fp8`` times all of them
side by side: docs/scale.md). Here a row of up to ``CHUNK`` features is read once, held in registers while its
maximum is found, and written as e4m3; a transpose moves square tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

#: Features a quantiser program holds in registers at once: a row up to this long is read once; a longer row is
#: read in chunks of it twice (maxima, then the cast: the second read hits L2).
CHUNK = 8192


@triton.jit
def _scaled_chunk(x_row, col_ptr, offsets, n, HAS_COL: tl.constexpr):
    """The row's features at ``offsets`` (zeros past n) in fp32, times the column scales with ``HAS_COL``."""
    mask = offsets < n
    x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL:
        x = x * tl.load(col_ptr + offsets, mask=mask, other=0.0)
    return x


@triton.jit
def _quantize_rows_kernel(x_ptr, col_ptr, q_ptr, scale_ptr, n, x_stride, amax_floor, fp8_max,
                          HAS_COL: tl.constexpr, BLOCK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * x_stride, q_ptr + row * n
    if ONE_CHUNK:
        offsets = tl.arange(0, BLOCK)
        x = _scaled_chunk(x_row, col_ptr, offsets, n, HAS_COL)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), amax_floor) / fp8_max
        tl.store(q_row + offsets, tl.div_rn(x, scale).to(q_ptr.dtype.element_ty), mask=offsets < n)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            amax = tl.maximum(amax, tl.abs(_scaled_chunk(x_row, col_ptr, start + tl.arange(0, BLOCK), n, HAS_COL)))
        scale = tl.maximum(tl.max(amax, axis=0), amax_floor) / fp8_max
        for start in range(0, n, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = _scaled_chunk(x_row, col_ptr, offsets, n, HAS_COL)
            tl.store(q_row + offsets, tl.div_rn(x, scale).to(q_ptr.dtype.element_ty), mask=offsets < n)
    tl.store(scale_ptr + row, scale)


def quantize_rows(t: torch.Tensor, col_scale: Optional[torch.Tensor], fp8_dtype: torch.dtype, amax_floor: float,
                  fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``t * col_scale`` (rows, n) per row to ``fp8_dtype`` values and fp32 scales (rows, 1): one program a row."""
    rows, n = t.shape
    q = torch.empty(rows, n, dtype=fp8_dtype, device=t.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=t.device)
    block = min(triton.next_power_of_2(n), CHUNK)
    col = col_scale.reshape(-1) if col_scale is not None else t  # unread without HAS_COL
    _quantize_rows_kernel[(rows,)](t, col, q, scale, n, t.stride(0), amax_floor, fp8_max,
                                   HAS_COL=col_scale is not None, BLOCK=block, ONE_CHUNK=n <= block,
                                   num_warps=max(4, block // 1024))
    return q, scale


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, m, n, TILE: tl.constexpr):
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    cols = tl.program_id(1) * TILE + tl.arange(0, TILE)
    mask = (rows[:, None] < m) & (cols[None, :] < n)
    tile = tl.load(src_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], mask=mask)
    tl.store(dst_ptr + cols[None, :].to(tl.int64) * m + rows[:, None], tile, mask=mask)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """A contiguous (b, a) copy of a contiguous 1-byte tensor (a, b), in 64 x 64 tiles."""
    m, n = t.shape
    out = torch.empty(n, m, dtype=t.dtype, device=t.device)
    _transpose_kernel[(triton.cdiv(m, 64), triton.cdiv(n, 64))](t, out, m, n, TILE=64)
    return out
