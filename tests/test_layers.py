"""MiSS math and the single-device layer against plain-PyTorch references and PEFT's MiSS tuner."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from miss_ds import MissConfig, MissLinear, MissShapeError, adapter_state_dict, apply_miss, merge_and_unload
from miss_ds import functional as MF
from miss_ds.adapter_io import load_full_adapter_into
from miss_ds.layers import MissLayer
from tests.conftest import tiny_llama_config

# (mode, in, out, r, mini_r): odd shapes where the mode allows them.
CASES = [("miss", 37, 24, 8, 1), ("miss", 8, 5, 8, 1), ("mini", 37, 24, 8, 6), ("bat", 32, 24, 8, 1)]


def reference_merged_weight(w: torch.Tensor, d: torch.Tensor, mode: str, r: int, mini_r: int) -> torch.Tensor:
    """W' written out element by element from the definition, in float64."""
    w, d = w.double(), d.double()
    out, inp = w.shape
    merged = w.clone()
    if mode == "bat":
        for a in range(out // r):
            for b in range(inp // r):
                blk = w[a * r:(a + 1) * r, b * r:(b + 1) * r]
                merged[a * r:(a + 1) * r, b * r:(b + 1) * r] = blk + blk @ d[a] + d[a]
        return merged
    full = d if mode == "miss" else d.repeat(1, out // mini_r)
    for c in range(inp):
        merged[:, c] += full[c % r, :]
    return merged


def make_layer(mode, inp, out, r, mini_r, bias=True):
    base = nn.Linear(inp, out, bias=bias)
    layer = MissLinear(copy.deepcopy(base), MissConfig(r=r, mode=mode, mini_r=mini_r, init_weights=False,
                                                       target_modules=["x"]), name="layer")
    return base, layer


@pytest.mark.parametrize("mode,inp,out,r,mini_r", CASES)
def test_forward_matches_definition(seeded, mode, inp, out, r, mini_r):
    base, layer = make_layer(mode, inp, out, r, mini_r)
    x = torch.randn(3, 5, inp)
    ref = x.double() @ reference_merged_weight(base.weight, layer.miss_block.detach(), mode, r, mini_r).T
    ref = ref + base.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,inp,out,r,mini_r", CASES)
def test_gradients_match_reference(seeded, mode, inp, out, r, mini_r):
    base, layer = make_layer(mode, inp, out, r, mini_r)
    x = torch.randn(2, 3, inp, requires_grad=True)
    target = torch.randn(2, 3, out)
    ((layer(x) - target) ** 2).sum().backward()
    d = layer.miss_block.detach().double().requires_grad_(True)
    x_ref = x.detach().double().requires_grad_(True)
    base.requires_grad_(False)
    ref = x_ref @ reference_merged_weight(base.weight, d, mode, r, mini_r).T + base.bias.double()
    ((ref - target.double()) ** 2).sum().backward()
    torch.testing.assert_close(layer.miss_block.grad.double(), d.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("mode,inp,out,r,mini_r", CASES)
def test_merge_and_unmerge(seeded, mode, inp, out, r, mini_r):
    base, layer = make_layer(mode, inp, out, r, mini_r)
    x = torch.randn(6, inp)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.weight, base.weight)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, base.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,inp,out,r,mini_r", CASES)
def test_matches_peft_layer(seeded, mode, inp, out, r, mini_r):
    peft = pytest.importorskip("peft")
    base, layer = make_layer(mode, inp, out, r, mini_r)
    init = {"miss": True, "mini": "mini", "bat": "bat"}[mode]
    theirs = peft.tuners.miss.layer.MissLinear(copy.deepcopy(base), "default",
                                                peft.MissConfig(r=r, mini_r=mini_r, init_weights=init), r=r)
    with torch.no_grad():
        theirs.miss_block["default"].copy_(layer.miss_block)
    x = torch.randn(2, 7, inp)
    torch.testing.assert_close(layer(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_aggregate_of_shards_sums_to_full(seeded):
    x = torch.randn(3, 45)
    full = MF.aggregate(x, 8)
    bounds = [0, 11, 23, 30, 45]  # ragged shards, none starting on a chunk boundary
    parts = sum(MF.aggregate(x[:, a:b], 8, in_offset=a) for a, b in zip(bounds, bounds[1:]))
    torch.testing.assert_close(parts, full)


def test_bf16_forward_close_to_fp32(seeded):
    base, layer = make_layer("miss", 64, 32, 16, 1)
    x = torch.randn(4, 64)
    ref = layer(x)
    out = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


def test_zero_init_leaves_base_unchanged(seeded):
    base = nn.Linear(20, 12)
    layer = MissLinear(copy.deepcopy(base), MissConfig(r=4, target_modules=["x"]))
    x = torch.randn(3, 20)
    assert torch.equal(layer.miss_block, torch.zeros(4, 12))
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("mode,kw,expect", [
    ("miss", dict(r=64), "r <= 48"),
    ("bat", dict(r=16), "r=4 fits"),
    ("mini", dict(r=8, mini_r=7), "mini_r=5 fits"),
])
def test_shape_errors_name_module_and_fit(mode, kw, expect):
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(48, 100))
    with pytest.raises(MissShapeError) as err:
        apply_miss(model, MissConfig(mode=mode, target_modules=["proj"], **kw))
    assert "'proj'" in str(err.value) and "in_features=48" in str(err.value) and expect in str(err.value)


def test_unmatched_targets_are_an_error():
    with pytest.raises(ValueError, match="matches no module"):
        apply_miss(nn.Sequential(nn.Linear(4, 4)), MissConfig(r=2, target_modules=["q_proj"]))


def _llama(seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=96)).eval()


@pytest.mark.parametrize("mode,r,mini_r", [("miss", 8, 1), ("miss", 12, 1), ("mini", 8, 16), ("bat", 16, 1)])
def test_tiny_llama_matches_peft(mode, r, mini_r):
    peft = pytest.importorskip("peft")
    base = _llama()
    ours = copy.deepcopy(base)
    report = apply_miss(ours, MissConfig(r=r, mode=mode, mini_r=mini_r, init_weights=False))
    assert report.adapted_modules == 14
    init = {"miss": True, "mini": "mini", "bat": "bat"}[mode]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(
        r=r, mini_r=mini_r, init_weights=init, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]))
    mine = adapter_state_dict(ours)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "miss_block" in name:
                p.copy_(mine[name.replace("base_model.model.", "").replace(".default", "")])
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ours(ids).logits, base(ids).logits, atol=1e-3)


def test_only_d_trains_and_adapter_state_round_trips():
    model = _llama()
    apply_miss(model, MissConfig(r=8, init_weights=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".miss_block") for n in trainable)
    state = adapter_state_dict(model)
    assert set(state) == trainable
    fresh = _llama()
    apply_miss(fresh, MissConfig(r=8))
    load_full_adapter_into(fresh, state, "adapter")
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="shape"):
        other = _llama()
        apply_miss(other, MissConfig(r=4))
        load_full_adapter_into(other, state, "adapter")


def test_modules_to_save_train_and_are_saved():
    model = _llama()
    apply_miss(model, MissConfig(r=8, modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad
    assert "lm_head.weight" in adapter_state_dict(model, MissConfig(r=8, modules_to_save=["lm_head"]))


def test_a_tied_lm_head_in_modules_to_save_trains():
    """With tie_word_embeddings the head's weight is the embedding's, listed once under the embedding's name:
    it must train all the same (and the embedding with it), and be saved under the head's name."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = MissConfig(r=8, modules_to_save=["lm_head"])
    apply_miss(model, cfg)
    assert model.lm_head.weight.requires_grad
    assert "lm_head.weight" in adapter_state_dict(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("model.norm") or ".mlp.up_proj.weight" in n for n in trainable)


@pytest.mark.parametrize("mode", ["miss", "bat"])
def test_merge_and_unload_gives_plain_model_with_same_output(mode):
    model = _llama()
    apply_miss(model, MissConfig(r=16, mode=mode, init_weights=False))
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        merge_and_unload(model)
        assert not any(isinstance(m, MissLayer) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
