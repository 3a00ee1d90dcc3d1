"""Tensor-parallel MiSS under DeepSpeed (CPU, gloo): TP x DP runs equal a single-device run, in every mode.

Each case launches ``tests/dist/tp_equivalence.py``, which checks losses, D gradients, D and the gathered merged
weights against a plain single-device reference at every step, and that MiSS adds no forward collective.
"""
from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from torch import nn

from miss_ds import MissConfig, MissLinear, MissShapeError
from miss_ds.layers import Span, Split
from miss_ds.parallel import ColumnParallelMissLinear, RowParallelMissLinear
from tests.launch_utils import deepspeed_run, result_of

CASES = [  # (ranks, tp, zero, offload, gradient accumulation steps)
    (2, 2, 0, False, 2), (2, 2, 1, False, 1), (2, 2, 2, False, 2), (4, 4, 0, False, 2), (4, 2, 1, False, 2),
    (4, 2, 2, True, 2), (4, 1, 2, False, 2),
]
#: The 8-GPU layouts of docs/scale.md as 8 CPU ranks: minutes on 2 cores, so only with MISS_DS_RANKS8=1.
CASES8 = [(8, 8, 1, False, 2), (8, 4, 1, False, 1), (8, 4, 2, False, 2), (8, 2, 1, False, 2), (8, 2, 2, False, 1)]
if os.environ.get("MISS_DS_RANKS8") == "1":
    CASES += CASES8


@pytest.mark.parametrize("ranks,tp,zero,offload,accum", CASES,
                         ids=[f"tp{t}xdp{r // t}-zero{z}{'-offload' if o else ''}-accum{a}" for r, t, z, o, a in CASES])
def test_tp_run_equals_single_device(ranks, tp, zero, offload, accum):
    """TP x DP with gradient accumulation equals one device training on the whole global batch at once."""
    args = ["--tp", str(tp), "--zero", str(zero), "--accum", str(accum)] + (["--offload"] if offload else [])
    # In float64: mini's D gradient is a sum over every output tile with heavy cancellation, so in fp32 the rounding
    # of a different summation order alone (8-way reductions; or the aggregation as a GEMM) moves it by 1e-4 to 5e-4.
    args += ["--float64"]
    proc = deepspeed_run("tests/dist/tp_equivalence.py", args, ranks)
    result = result_of(proc)
    assert result["failures"] == [], result["failures"]
    assert proc.returncode == 0
    assert [r["mode"] for r in result["results"]] == ["miss", "mini", "bat"]
    # Two row-parallel layers per block, one all-reduce each: the base's, and nothing from MiSS.
    expected = 4 if tp > 1 else 0
    assert all(r["forward_collectives"] == expected for r in result["results"])


@pytest.mark.parametrize("cls,sizes,dim", [(ColumnParallelMissLinear, [50, 50], "out_features"),
                                           (RowParallelMissLinear, [25, 25, 25, 25], "in_features")])
def test_bat_shard_that_splits_a_block_is_rejected(cls, sizes, dim):
    out_full, in_full = (100, 64) if cls is ColumnParallelMissLinear else (64, 100)
    shard_shape = (sizes[0], in_full) if cls is ColumnParallelMissLinear else (out_full, sizes[0])
    weight = nn.Parameter(torch.zeros(shard_shape))
    with pytest.raises(MissShapeError, match=rf"'mlp.proj'.*{dim} shards {re.escape(str(sizes))}.*parallel.tp_grain_size"):
        cls(weight, None, config=MissConfig(mode="bat", r=4, target_modules=["proj"]), name="mlp.proj",
            group=None, split=Split.contiguous(sizes), tp_rank=0, full_shape=(out_full, in_full))


def test_ragged_row_shard_keeps_global_chunk_offset():
    """A row shard starting mid-chunk aggregates at its global offset: two shards sum to the full layer."""
    torch.manual_seed(0)
    full = nn.Linear(100, 24, bias=False)
    cfg = MissConfig(r=8, init_weights=False, target_modules=["p"])
    x = torch.randn(3, 100)
    shards = []
    for rank, (lo, hi) in enumerate([(0, 50), (50, 100)]):
        torch.manual_seed(1)
        shards.append(RowParallelMissLinear(nn.Parameter(full.weight[:, lo:hi].clone()), None, config=cfg, name="p",
                                            group=None, split=Split.contiguous([50, 50]), tp_rank=rank,
                                            full_shape=(24, 100)))
    torch.manual_seed(1)
    ref = MissLinear(full, cfg)
    total = shards[0](x[:, :50]) + shards[1](x[:, 50:])
    torch.testing.assert_close(total, ref(x), rtol=1e-5, atol=1e-5)
    assert shards[1].sharding.span("weight") == Span(dim=1, ranges=((50, 100),), full=100)
    assert shards[1].sharding.span("bias") is None and ref.sharding.span("weight") is None


@pytest.mark.parametrize("mode,mini_r", [("miss", 1), ("mini", 4), ("bat", 1)])
def test_column_shards_are_the_parts_of_the_single_device_layer(mode, mini_r):
    """Every rank draws the full D from the same RNG state and keeps its part, so an uneven column split starts
    from the single-device layer's D; its merged weights and outputs are that layer's, cut along out."""
    torch.manual_seed(0)
    full = nn.Linear(64, 96)
    cfg = MissConfig(r=8, mode=mode, mini_r=mini_r, init_weights=False, target_modules=["p"])
    torch.manual_seed(1)
    ref = MissLinear(copy.deepcopy(full), cfg)
    sizes, shards = [56, 40], []
    for rank, (lo, hi) in enumerate([(0, 56), (56, 96)]):
        torch.manual_seed(1)
        shards.append(ColumnParallelMissLinear(nn.Parameter(full.weight[lo:hi].clone()),
                                               nn.Parameter(full.bias[lo:hi].clone()), config=cfg, name="p",
                                               full_shape=(96, 64), split=Split.contiguous(sizes), tp_rank=rank))
    layout = shards[0].d_layout
    assert layout.replicated == (mode == "mini")
    if not layout.replicated:
        assert sum(layout.sizes) == ref.miss_block.shape[layout.dim]
    for rank, shard in enumerate(shards):
        assert torch.equal(shard.miss_block, layout.part(ref.miss_block, rank))
    assert shards[1].sharding.span("bias") == Span(dim=0, ranges=((56, 96),), full=96)
    torch.testing.assert_close(torch.cat([s.merged_weight() for s in shards]), ref.merged_weight())
    x = torch.randn(3, 64)
    torch.testing.assert_close(torch.cat([s(x) for s in shards], dim=-1), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,mini_r", [("miss", 1), ("mini", 4), ("bat", 1)])
def test_fused_column_shards_are_the_parts_of_the_single_device_layer(mode, mini_r):
    """A fused projection [q; k; v] (widths 32, 16, 16) split per part over 2 ranks: each rank's weight, D, merged
    weight and output are the single-device layer's rows of its q, k and v slices, concatenated."""
    torch.manual_seed(0)
    full = nn.Linear(64, 64, bias=True)
    cfg = MissConfig(r=8 if mode != "bat" else 4, mode=mode, mini_r=mini_r, init_weights=False, target_modules=["p"])
    torch.manual_seed(1)
    ref = MissLinear(copy.deepcopy(full), cfg)
    split = Split(((16, 16), (8, 8), (8, 8)))
    assert split.ranges(1) == ((16, 32), (40, 48), (56, 64)) and split.sizes == (32, 32)
    shards = []
    for rank in range(2):
        torch.manual_seed(1)
        shards.append(ColumnParallelMissLinear(nn.Parameter(split.take(full.weight.detach(), 0, rank).clone()),
                                               nn.Parameter(split.take(full.bias.detach(), 0, rank).clone()),
                                               config=cfg, name="p", full_shape=(64, 64), split=split, tp_rank=rank))
    layout = shards[0].d_layout
    assert layout.replicated == (mode == "mini")
    assert torch.equal(layout.join([s.miss_block for s in shards]), ref.miss_block)
    for rank, shard in enumerate(shards):
        assert torch.equal(shard.miss_block, layout.part(ref.miss_block, rank))
    torch.testing.assert_close(split.join([s.merged_weight() for s in shards], 0), ref.merged_weight())
    x = torch.randn(3, 64)
    torch.testing.assert_close(split.join([s(x) for s in shards], -1), ref(x), rtol=1e-5, atol=1e-5)
    assert shards[1].sharding.span("weight") == Span(dim=0, ranges=((16, 32), (40, 48), (56, 64)), full=64)


def test_fused_shard_that_breaks_the_mini_tiling_is_rejected():
    """mini_r=4 over parts whose shards are 6 wide: rank 0's k slice would not continue its q slice's tiling."""
    split = Split(((6, 6), (6, 6)))
    with pytest.raises(MissShapeError, match=r"mini_r=4 cannot split module 'qkv'.*fused parts \[\[6, 6\], \[6, 6\]\]"):
        ColumnParallelMissLinear(nn.Parameter(torch.zeros(12, 16)), None, config=MissConfig(
            mode="mini", r=4, mini_r=4, target_modules=["qkv"]), name="qkv", full_shape=(24, 16), split=split)
