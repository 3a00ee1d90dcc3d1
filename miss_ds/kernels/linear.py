"""Triton GEMMs for MiSS's additive form: the frozen product with MiSS folded into its last K step or epilogue.

forward:     y  = x @ W^T + agg @ D              (M, N); agg (M, r) is one extra K step of width r
input grad:  dx = dy @ W + g[:, (off + k) mod r]   (M, K); g = dy @ D^T (M, r) is gathered in the epilogue

Tiles follow the grouped ordering of Triton's matmul tutorial (GROUP_M row blocks share W tiles in L2). Rows
and columns past the edge are clamped for loads (``% M``) and masked only at the store, so the main loop masks K
alone, and only when K is not a multiple of the K tile.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _configs(m: str, n: str, k: str) -> list[triton.Config]:
    """Hopper-sized tiles (the autotuner picks per shape); one small tile under the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({m: 32, n: 32, k: 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    tiles = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))
    return [triton.Config({m: bm, n: bn, k: bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


@triton.jit
def _tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time."""
    n_rows = tl.cdiv(rows, BLOCK_ROWS)
    n_cols = tl.cdiv(cols, BLOCK_COLS)
    group = pid // (GROUP_M * n_cols)
    first = group * GROUP_M
    size = min(n_rows - first, GROUP_M)
    return first + (pid % (GROUP_M * n_cols)) % size, (pid % (GROUP_M * n_cols)) // size


@triton.jit
def _k_loop(a_ptrs, b_ptrs, a_step, b_step, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            EVEN_K: tl.constexpr):
    """Sum over K of A tiles (BM, BK) times B tiles (BK, BN) in fp32, both pointer blocks walking by BK."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k * BK, other=0.0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k * BK, other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.autotune(configs=_configs("BM", "BN", "BK"), key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})
@triton.jit
def _forward_kernel(x_ptr, w_ptr, agg_ptr, d_ptr, y_ptr, M, N, K, R,
                    s_xm, s_xk, s_wn, s_wk, s_am, s_ar, s_dr, s_dn, s_ym, s_yn,
                    BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm_in, rn_in = rm % M, rn % N
    acc = _k_loop(x_ptr + rm_in[:, None] * s_xm + rk[None, :] * s_xk,
                  w_ptr + rn_in[None, :] * s_wn + rk[:, None] * s_wk, BK * s_xk, BK * s_wk, K, BM, BN, BK, EVEN_K)
    # MiSS: one more K step, agg (BM, r) times D (r, BN); r is padded to BR with zeros.
    rr = tl.arange(0, BR)
    agg = tl.load(agg_ptr + rm_in[:, None] * s_am + rr[None, :] * s_ar, mask=rr[None, :] < R, other=0.0)
    d = tl.load(d_ptr + rr[:, None] * s_dr + rn_in[None, :] * s_dn, mask=rr[:, None] < R, other=0.0)
    acc += tl.dot(agg, d)
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_configs("BM", "BC", "BO"), key=["M", "C", "O"])
@triton.heuristics({"EVEN_O": lambda a: a["O"] % a["BO"] == 0})
@triton.jit
def _input_grad_kernel(dy_ptr, w_ptr, g_ptr, dx_ptr, M, C, O, R, OFFSET,
                       s_ym, s_yo, s_wo, s_wc, s_gm, s_gr, s_xm, s_xc,
                       BM: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_O: tl.constexpr):
    """dx (M, C) = dy (M, O) @ W (O, C) + g[:, (OFFSET + c) mod R]; C is in_features, O out_features."""
    pid_m, pid_c = _tile(tl.program_id(0), M, C, BM, BC, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_c * BC + tl.arange(0, BC)
    ro = tl.arange(0, BO)
    rm_in, rc_in = rm % M, rc % C
    acc = _k_loop(dy_ptr + rm_in[:, None] * s_ym + ro[None, :] * s_yo,
                  w_ptr + ro[:, None] * s_wo + rc_in[None, :] * s_wc, BO * s_yo, BO * s_wo, O, BM, BC, BO, EVEN_O)
    # MiSS: feature c of the input collects chunk position (OFFSET + c) mod R.
    g = tl.load(g_ptr + rm_in[:, None] * s_gm + ((rc_in + OFFSET) % R)[None, :] * s_gr)
    acc += g.to(tl.float32)
    tl.store(dx_ptr + rm[:, None] * s_xm + rc[None, :] * s_xc, acc.to(dx_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rc[None, :] < C))


def _block_r(r: int) -> int:
    """r rounded up to a tile width tl.dot accepts (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(r))


def fused_forward(x: torch.Tensor, w: torch.Tensor, agg: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x (M, K) @ w (N, K)^T + agg (M, r) @ d (r, N), in x's dtype with fp32 accumulation."""
    (m, k), n, r = x.shape, w.shape[0], agg.shape[1]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    _forward_kernel[grid](x, w, agg, d, y, m, n, k, r, *x.stride(), *w.stride(), *agg.stride(), *d.stride(),
                          *y.stride(), BR=_block_r(r))
    return y


def fused_input_grad(dy: torch.Tensor, w: torch.Tensor, g: torch.Tensor, in_offset: int) -> torch.Tensor:
    """dx (M, K) = dy (M, N) @ w (N, K) + g (M, r) spread over the input chunks from global index ``in_offset``."""
    (m, o), c, r = dy.shape, w.shape[1], g.shape[1]
    dx = torch.empty((m, c), device=dy.device, dtype=dy.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(c, meta["BC"]),)  # noqa: E731
    _input_grad_kernel[grid](dy, w, g, dx, m, c, o, r, in_offset % r, *dy.stride(), *w.stride(), *g.stride(),
                             *dx.stride())
    return dx
