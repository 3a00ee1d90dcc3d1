"""The fused Triton kernels against float64 references and against the PyTorch path they replace.

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py) in fp16: it mishandles
bf16 tensors (a bf16 load-store round trip returns garbage), so bf16 is covered on GPUs only, where these tests
run with CUDA tensors (``tools/scale_x2.sh kernels``).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from miss_ds import MissConfig, MissLinear, kernels
from miss_ds import functional as MF
from tests.launch_utils import ROOT

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
# (M, K, N, r, in_offset): ragged everywhere: K not a multiple of the K tile, r not a power of two, shard offsets.
SHAPES = [(40, 37, 29, 8, 0), (64, 64, 48, 16, 3), (33, 70, 50, 24, 5), (7, 96, 130, 64, 40)]


@pytest.fixture(scope="module")
def triton_backend():
    """The Triton kernels module (interpreted without a GPU: see conftest.py)."""
    assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"
    return importlib.import_module("miss_ds.kernels.linear")


@pytest.fixture
def fused_on_cpu(monkeypatch, triton_backend):
    """Let MiSS layers take the fused path for CPU tensors too (through the interpreter); CUDA takes it anyway."""
    monkeypatch.setattr(kernels, "enabled", lambda x: kernels._switch and x.dtype in (torch.float16, torch.bfloat16))
    kernels.use(True)
    yield
    kernels.use(False)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r,off", SHAPES)
def test_forward_kernel_equals_float64(triton_backend, dtype, m, k, n, r, off):
    g = torch.Generator().manual_seed(m * k + n)
    x, w, agg, d = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((m, k), (n, k), (m, r), (r, n)))
    y = triton_backend.fused_forward(x, w, agg, d)
    want = x.double() @ w.double().T + agg.double() @ d.double()
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r,off", SHAPES)
def test_input_grad_kernel_equals_float64(triton_backend, dtype, m, k, n, r, off):
    g = torch.Generator().manual_seed(m + k * n)
    dy, w, gm = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((m, n), (n, k), (m, r)))
    dx = triton_backend.fused_input_grad(dy, w, gm, off)
    cols = (torch.arange(k, device=DEVICE) + off) % r
    want = dy.double() @ w.double() + gm.double()[:, cols]
    assert rel_err(dx, want) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["miss", "mini"])
@pytest.mark.parametrize("in_offset", [0, 5])
def test_layer_with_kernels_equals_pytorch_path(fused_on_cpu, dtype, mode, in_offset):
    """Forward, input gradient and D's gradient of a shard (out 48, in 37 at offset ``in_offset``), fused vs not."""
    torch.manual_seed(0)
    geom = MF.MissGeometry(mode=mode, r=8, mini_r=16, in_features=37, out_features=48, in_offset=in_offset,
                           out_offset=0)
    w = torch.randn(48, 37, device=DEVICE, dtype=dtype)
    d0 = torch.randn(8, 16 if mode == "mini" else 48, device=DEVICE)  # fp32 D, as the trainer keeps it
    x0 = torch.randn(2, 9, 37, device=DEVICE, dtype=dtype)
    dy = torch.randn(2, 9, 48, device=DEVICE, dtype=dtype)
    results = []
    for fused in (True, False):
        kernels.use(fused)
        x, d = x0.clone().requires_grad_(), d0.clone().requires_grad_()
        y = MF.adapted_linear(x, w, d, geom)
        y.backward(dy)
        results.append((y, x.grad, d.grad))
    for got, want, name in zip(results[0], results[1], ("y", "dx", "dD")):
        assert rel_err(got, want.double()) < 2e-2, name
    assert d.grad.dtype == torch.float32


def test_kernels_are_taken_only_for_half_precision_cuda_tensors():
    """CUDA, half precision, and switched on (off by default): everything else takes the PyTorch path."""
    assert os.environ.get("MISS_DS_KERNELS") == "1" or not kernels._switch
    try:
        kernels.use(True)
        assert not kernels.enabled(torch.zeros(2, dtype=torch.float16))
        if CUDA:
            half = torch.zeros(2, device="cuda", dtype=torch.float16)
            assert kernels.enabled(half) and not kernels.enabled(half.float())
            kernels.use(False)
            assert not kernels.enabled(half)
    finally:
        kernels.use(False)


def test_miss_linear_in_half_precision_takes_the_fused_path(fused_on_cpu, monkeypatch):
    """A MissLinear in fp16 with random D and a bias calls the fused forward and equals the float64 definition."""
    calls = []
    fused = kernels.miss_forward
    monkeypatch.setattr(kernels, "miss_forward", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(1)
    base = torch.nn.Linear(40, 24, bias=True).to(DEVICE, torch.float16)
    layer = MissLinear(base, MissConfig(r=8, init_weights=False, target_modules=["x"]))
    x = torch.randn(3, 5, 40, device=DEVICE, dtype=torch.float16)
    agg = x.double().reshape(3, 5, 5, 8).sum(-2)
    want = x.double() @ base.weight.double().T + base.bias.double() + agg @ layer.miss_block.detach().double()
    assert rel_err(layer(x), want) < 1e-2
    assert calls == [1]


def test_every_autotune_config_compiles_for_hopper_with_pipelined_tensor_core_loops():
    """No GPU needed: Triton's own ptxas builds every autotune configuration of both kernels for sm_90. Each must
    fit the H100's 227 KiB of shared memory, pipeline its loads (cp.async) and multiply with wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "tools/kernel_aot.py", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["kernel"] for r in rows} == {"forward", "input_grad"} and len(rows) >= 4
    for row in rows:
        assert row["pipelined"] and row["wgmma"] > 0 and row["shared_bytes"] <= 227 * 1024, row
