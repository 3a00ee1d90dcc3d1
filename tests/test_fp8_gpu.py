"""The FP8 base on a GPU with FP8 tensor cores (skipped elsewhere): the Triton quantiser and transpose against
their eager definitions, each projection of the Llama-2-70B shape against bf16 and float64, and the default job trained
in bf16 and on an FP8 base to the same eval loss. ``pytest -s`` prints the measured errors and losses
(docs/scale.md quotes them)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from miss_ds import MissConfig, MissLinear, fp8
from tests.launch_utils import train_default_job_on_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")
BF16 = torch.bfloat16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_kernels_equal_the_eager_definitions():
    """The Triton quantiser computes what the eager definition does (rows of 1024 and 28672 features, with and
    without folded column scales, a row of zeros): the same scales, e4m3 bytes equal but for rare ties of the
    division (at most one e4m3 step); the tiled transpose equals ``t.t()`` on shapes that are not multiples of its
    tile."""
    gen = torch.Generator("cuda").manual_seed(0)
    for rows, n in ((4099, 1024), (257, 28672)):
        t = torch.randn(rows, n, device="cuda", generator=gen).to(BF16) * 3
        t[1] = 0
        col = torch.rand(1, n, device="cuda", generator=gen) * 1e-3
        for scale in (None, col):
            q, s = fp8.quantize_rows(t, scale)
            q_eager, s_eager = fp8.quantize_rows_eager(t, scale)
            torch.testing.assert_close(s, s_eager, rtol=1e-6, atol=0)
            same = (q.view(torch.uint8) == q_eager.view(torch.uint8)).float().mean().item()
            assert same > 0.999, same
            assert rel(fp8.dequantize_rows(q, s), fp8.dequantize_rows(q_eager, s_eager)) < 1e-3
            assert (q[1].float() == 0).all()
    w = fp8.FP8Weight.from_weight(torch.randn(1040, 2064, device="cuda", generator=gen).to(BF16))
    assert torch.equal(fp8.transposed(w.data).view(torch.uint8), w.data.view(torch.uint8).t())
    odd = torch.randint(0, 255, (1000, 70), dtype=torch.uint8, device="cuda", generator=gen)
    assert torch.equal(fp8.transposed(odd), odd.t())


#: The projections of one Llama-2-70B decoder layer at TP=1 (in, out).
PROJECTIONS = {"q_proj/o_proj": (8192, 8192), "k_proj/v_proj": (8192, 1024), "gate_proj/up_proj": (8192, 28672),
               "down_proj": (28672, 8192)}


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_each_70b_projection_on_fp8_against_bf16_and_float64(name):
    """A MiSS layer (r=64, random D) on its FP8 base against the same layer on bf16 and against float64 over the
    bf16 weights, 4096 tokens: outputs and input gradients within 5% (quantisation: e4m3 keeps 3 mantissa bits);
    D's gradient, computed from the unquantised x and dy in both, closer still."""
    in_f, out_f = PROJECTIONS[name]
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=BF16).requires_grad_(False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    config = MissConfig(r=64, init_weights=False)
    layers = {"bf16": MissLinear(linear, config), "fp8": MissLinear(copy.deepcopy(linear), config)}
    with torch.no_grad():
        layers["fp8"].miss_block.copy_(layers["bf16"].miss_block)
    layers["fp8"].to_fp8()
    x = torch.randn(4096, in_f, device="cuda", dtype=BF16)
    dy = torch.randn(4096, out_f, device="cuda", dtype=BF16) * 1e-3
    got = {}
    for precision, layer in layers.items():
        xs = x.clone().requires_grad_(True)
        y = layer(xs)
        y.backward(dy)
        got[precision] = (y.detach(), xs.grad, layer.miss_block.grad)
    w64, d64 = linear.weight.double(), layers["bf16"].miss_block.detach().to(BF16).double()
    x64 = x.double().requires_grad_(True)
    agg = x64.reshape(4096, -1, 64).sum(1)
    y64 = x64 @ w64.t() + agg @ d64
    y64.backward(dy.double())
    errors = {p: {"y_vs_bf16": rel(g[0], got["bf16"][0]), "dx_vs_bf16": rel(g[1], got["bf16"][1]),
                  "y_vs_f64": rel(g[0], y64), "dx_vs_f64": rel(g[1], x64.grad),
                  "dD_vs_bf16": rel(g[2], got["bf16"][2])} for p, g in got.items()}
    rounded = {p: {k: round(v, 5) for k, v in e.items()} for p, e in errors.items()}
    print(f"\nFP8 numerics {name} {in_f}->{out_f}: {json.dumps(rounded)}")
    e = errors["fp8"]
    assert e["y_vs_bf16"] < 0.05 and e["dx_vs_bf16"] < 0.05 and e["y_vs_f64"] < 0.05 and e["dx_vs_f64"] < 0.05
    assert errors["bf16"]["y_vs_f64"] < 0.01 and errors["bf16"]["dx_vs_f64"] < 0.01  # the bf16 path's own rounding
    assert e["y_vs_f64"] > 3 * errors["bf16"]["y_vs_f64"]  # the FP8 path did run: its error is quantisation's
    assert e["dD_vs_bf16"] < 0.01


def test_default_job_on_an_fp8_base_reaches_the_bf16_eval_loss(tmp_path):
    """The README's default job (150 steps of the tiny Llama on the arithmetic corpus, lr 3e-3) on the GPU in bf16
    and on an FP8 base: the final eval loss of the FP8 run within 3% of the bf16 run's, and both learned (the last
    eval loss under half the first logged train loss). At the default lr 1e-2 the bf16 run alone moves its final
    eval loss by 7% between CPU and GPU (0.98 vs 1.05): too chaotic to compare at 3%; at 3e-3 two seeds' bf16 and
    FP8 CPU runs end within 1.3% (0.917/0.905, 0.888/0.885) and lower than at 1e-2."""
    runs = {p: train_default_job_on_gpu(tmp_path / p, "model.dtype=bfloat16", f"model.base_precision={p}",
                                        "train.lr=3e-3") for p in ("bf16", "fp8")}
    print("\nFP8 convergence: " + json.dumps({p: {"eval": [round(v, 4) for v in r["eval"]],
                                                   "step_s": r["summary"]["step_s_median"]} for p, r in runs.items()}))
    assert runs["fp8"]["summary"]["base_precision"] == "fp8" and runs["bf16"]["summary"]["base_precision"] == "bf16"
    bf16, fp8_losses = runs["bf16"]["eval"], runs["fp8"]["eval"]
    assert len(bf16) == len(fp8_losses) == 3
    assert abs(fp8_losses[-1] - bf16[-1]) <= 0.03 * bf16[-1], (fp8_losses, bf16)
    for run in runs.values():
        assert run["eval"][-1] < 0.5 * run["first_train"]
