"""MiSS on Megatron-core's ColumnParallelLinear / RowParallelLinear equals single-device MiSS (CPU, gloo).

A Megatron-style MLP (column up-projection with its bias added, GELU, row down-projection with ``skip_bias_add``)
is adapted with ``apply_miss`` on a TP group of all ranks; a plain ``nn.Linear`` copy of the full weights is
adapted with the same seed. Output, input gradient and every D gradient must agree, in every mode; a layer with
sequence parallelism must be refused by name. Prints one RESULT line (rank 0).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.core import parallel_state  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from miss_ds import MissConfig, apply_miss  # noqa: E402
from miss_ds.distributed import exit_process, init_distributed  # noqa: E402

HIDDEN, INNER = 40, 64
MODES = {"miss": dict(mode="miss", r=12), "mini": dict(mode="mini", r=8, mini_r=4), "bat": dict(mode="bat", r=8)}


class MegatronMLP(nn.Module):
    def __init__(self, cfg: ModelParallelConfig) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(HIDDEN, INNER, config=cfg, init_method=nn.init.normal_, bias=True,
                                       gather_output=False)
        self.down = RowParallelLinear(INNER, HIDDEN, config=cfg, init_method=nn.init.normal_, bias=True,
                                      input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.up(x)
        y, bias = self.down(F.gelu(h))
        return y + bias


def gathered(shard: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, shard.contiguous())
    return torch.cat(parts, dim=dim)


def reference_of(model: MegatronMLP) -> nn.Sequential:
    """Single-device copy: random biases (the same on every rank) replace Megatron's zeros in both models."""
    torch.manual_seed(2)
    up_bias, down_bias = torch.randn(INNER), torch.randn(HIDDEN)
    with torch.no_grad():
        model.up.bias.copy_(up_bias.chunk(dist.get_world_size())[dist.get_rank()])
        model.down.bias.copy_(down_bias)
    ref = nn.Sequential(nn.Linear(HIDDEN, INNER), nn.GELU(), nn.Linear(INNER, HIDDEN))
    with torch.no_grad():
        ref[0].weight.copy_(gathered(model.up.weight.detach(), 0))
        ref[0].bias.copy_(up_bias)
        ref[2].weight.copy_(gathered(model.down.weight.detach(), 1))
        ref[2].bias.copy_(down_bias)
    return ref


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def run_mode(mode: str, cfg: ModelParallelConfig) -> dict:
    torch.manual_seed(0)
    model = MegatronMLP(cfg)
    ref = reference_of(model)
    miss = MissConfig(init_weights=False, target_modules=["up", "down", "0", "2"], **MODES[mode])
    torch.manual_seed(1)
    apply_miss(model, miss)
    torch.manual_seed(1)
    apply_miss(ref, miss)
    torch.manual_seed(3)
    x = torch.randn(3, 5, HIDDEN)
    dy = torch.randn(3, 5, HIDDEN)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [model(xs[0]), ref(xs[1])]
    for y, xi in zip(ys, xs):
        y.backward(dy)
    errors = {"y": rel(ys[0], ys[1]), "dx": rel(xs[0].grad, xs[1].grad)}
    for name, ref_name in (("up", "0"), ("down", "2")):
        layer, ref_layer = model.get_submodule(name), ref.get_submodule(ref_name)
        errors[f"dD {name}"] = rel(layer.miss_block.grad, layer.shard_d(ref_layer.miss_block.grad))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {"errors": errors, "trainable": trainable, "types": [type(model.up).__name__, type(model.down).__name__]}


def refused_sequence_parallel(cfg: ModelParallelConfig) -> str:
    sp = ModelParallelConfig(**{**vars(cfg), "sequence_parallel": True})
    layer = nn.Sequential(ColumnParallelLinear(HIDDEN, INNER, config=sp, init_method=nn.init.normal_, bias=False,
                                               gather_output=False))
    try:
        apply_miss(layer, MissConfig(r=8, target_modules=["0"]))
    except ValueError as exc:
        return str(exc)
    return ""


def main() -> None:
    info = init_distributed()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=info.world_size)
    cfg = ModelParallelConfig(tensor_model_parallel_size=info.world_size, use_cpu_initialization=True)
    result = {"tp": info.world_size, "modes": {m: run_mode(m, cfg) for m in MODES},
              "sequence_parallel_error": refused_sequence_parallel(cfg)}
    if info.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    parallel_state.destroy_model_parallel()
    exit_process(0)


if __name__ == "__main__":
    main()
