"""ModelShape's counts against what transformers and miss_ds actually build, and flops against torch's counter."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from miss_ds import MissConfig, apply_miss
from miss_ds.flops import frozen_finetune_flops_per_token
from miss_ds.layers import Split
from miss_ds.model_shape import ModelShape
from miss_ds.parallel.layers import ColumnParallelMissLinear, RowParallelMissLinear


def llama_config(**kw) -> LlamaConfig:
    """A small Llama whose head_dim (32) is not hidden // heads (16), so a wrong head_dim rule shows."""
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=100)
    return LlamaConfig(**{**fields, **kw})


def meta_llama(config: LlamaConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_head_dim_is_the_configs_or_hidden_over_heads():
    assert ModelShape.from_config(llama_config()).head_dim == 32
    assert ModelShape.from_config(llama_config(head_dim=None)).head_dim == 16
    assert ModelShape(layers=1, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=100).head_dim == 16


@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_the_built_model(tied):
    config = llama_config(tie_word_embeddings=tied)
    model, shape = meta_llama(config), ModelShape.from_config(config)
    assert shape.tied_embeddings is tied
    assert shape.base_params() == sum(p.numel() for p in model.parameters())  # tied weights counted once
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert shape.linear_params() == sum(m.weight.numel() for m in linears.values())
    for layer in range(config.num_hidden_layers):
        built = {name.rsplit(".", 1)[1]: (m.in_features, m.out_features) for name, m in linears.items()
                 if name.startswith(f"model.layers.{layer}.")}
        assert shape.projections() == built


@pytest.mark.parametrize("mode", ["miss", "mini", "bat"])
def test_adapter_params_equal_the_d_miss_ds_builds(mode):
    config, r, mini_r = llama_config(), 8, 4
    model, shape = meta_llama(config), ModelShape.from_config(config)
    apply_miss(model, MissConfig(r=r, mode=mode, mini_r=mini_r))
    built = sum(p.numel() for name, p in model.named_parameters() if name.endswith("miss_block"))
    assert shape.adapter_params(r, mode, mini_r) == built


@pytest.mark.parametrize("mode", ["miss", "mini", "bat"])
def test_adapter_params_under_tp_equal_one_ranks_d(mode):
    """The column/row MiSS layers of TP rank 0 of 2 hold, per layer, adapter_params(tp=2) / layers of D."""
    tp, r, mini_r = 2, 8, 4
    shape = ModelShape.from_config(llama_config())
    config = MissConfig(r=r, mode=mode, mini_r=mini_r)
    local = 0
    for name, (fan_in, fan_out) in shape.projections().items():
        column = shape.style(name) == "column"
        sizes = [(fan_out if column else fan_in) // tp] * tp
        weight = nn.Parameter(torch.zeros((sizes[0], fan_in) if column else (fan_out, sizes[0])))
        cls = ColumnParallelMissLinear if column else RowParallelMissLinear
        layer = cls(weight, None, config=config, name=name, group=None, split=Split.contiguous(sizes), tp_rank=0,
                    full_shape=(fan_out, fan_in))
        local += layer.miss_block.numel()
    assert shape.adapter_params(r, mode, mini_r, tp=tp) == shape.layers * local


def test_flops_per_token_is_twice_the_counted_forward():
    """The forward's matrix products as torch counts them (eager attention: QK^T and AV as bmm), twice."""
    config, seq = llama_config(), 16
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, config.vocab_size, (1, seq)))
    assert frozen_finetune_flops_per_token(config, seq) == 2 * counter.get_total_flops() / seq
