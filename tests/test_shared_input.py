"""Sibling MiSS layers computed together (one aggregation, one input-gradient buffer) against float64 definitions
and against the same model computed layer by layer."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from miss_ds import MissConfig, apply_miss, miss_layers
from miss_ds import functional as MF
from miss_ds import recompute
from miss_ds.modeling import enable_recompute
from tests.conftest import tiny_llama_config


def reference_aggregate(x: torch.Tensor, r: int, in_offset: int) -> torch.Tensor:
    """agg(x) from the definition: zero-pad to the global chunk grid, view as chunks of r, sum the chunks."""
    lead = in_offset % r
    padded = F.pad(x, (lead, (-(lead + x.shape[-1])) % r))
    return padded.reshape(*x.shape[:-1], -1, r).sum(-2)


@pytest.mark.parametrize("r,in_features,in_offset", [(8, 37, 0), (5, 23, 7), (4, 16, 0)])
def test_shared_input_products_match_float64_definition(r, in_features, in_offset):
    """Three projections (miss, mini with a shard offset, miss) on one input: outputs and the gradients of x and of
    every D equal plain autograd over the definition, also when one output is unused."""
    gen = torch.Generator().manual_seed(0)
    geometries = [MF.MissGeometry("miss", r, 1, in_features, 11, in_offset=in_offset),
                  MF.MissGeometry("mini", r, 3, in_features, 9, in_offset=in_offset, out_offset=4),
                  MF.MissGeometry("miss", r, 1, in_features, 6, in_offset=in_offset)]
    x = torch.randn(2, 5, in_features, dtype=torch.float64, generator=gen)
    ws = [torch.randn(g.out_features, in_features, dtype=torch.float64, generator=gen) for g in geometries]
    ds = [torch.randn(g.d_shape, dtype=torch.float64, generator=gen) for g in geometries]

    def run(fn, used):
        xs = x.clone().requires_grad_(True)
        dd = [d.clone().requires_grad_(True) for d in ds]
        outs = fn(xs, dd)
        loss = sum((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum()
                   for i, out in enumerate(outs) if i in used)
        loss.backward()
        return [o.detach() for o in outs], xs.grad, [d.grad for d in dd]

    def ours(xs, dd):
        return MF.shared_input_products(xs, [(w, d, g) for w, d, g in zip(ws, dd, geometries)])

    def definition(xs, dd):
        agg = reference_aggregate(xs, r, in_offset)
        return [xs @ w.T + agg @ MF.expand_d(d, g) for w, d, g in zip(ws, dd, geometries)]

    for used in ({0, 1, 2}, {0, 2}):
        got, want = run(ours, used), run(definition, used)
        for a, b in zip(got[0], want[0]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
        for i, (a, b) in enumerate(zip(got[2], want[2])):
            if i in used:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            else:  # an unused output gives its D no gradient
                assert a is None and b is None


def _llama(mode: str = "miss") -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # bat needs every width divisible by r: the MLP at 96 instead of 100.
    model = LlamaForCausalLM(tiny_llama_config(**({"intermediate_size": 96} if mode == "bat" else {}))).double()
    apply_miss(model, MissConfig(r=8, mode=mode, mini_r=4, init_weights=False))
    return model


def _unlinked(model: torch.nn.Module) -> torch.nn.Module:
    alone = copy.deepcopy(model)
    for _, layer in miss_layers(alone):
        layer.siblings = None
    return alone


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["miss", "mini"])
@pytest.mark.parametrize("recompute", [False, True])
def test_llama_with_siblings_together_equals_layer_by_layer(mode, recompute, monkeypatch):
    """q/k/v and gate/up computed as two groups per decoder layer: loss and every D gradient equal the layer-by-layer
    model in float64, with and without recompute, and the groups really run (2 + 2 nodes per layer, not 7)."""
    model = _llama(mode)
    groups = {id(layer.siblings): sorted(n.rpartition(".")[2] for n in layer.siblings.names)
              for _, layer in miss_layers(model) if layer.siblings is not None}
    assert sorted(groups.values()) == [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2
    alone = _unlinked(model)
    if recompute:
        for m in (model, alone):
            m.train()
            enable_recompute(m, None)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

    calls = []
    apply = MF._SharedInputMiss.apply
    monkeypatch.setattr(MF._SharedInputMiss, "apply", lambda *a: calls.append(len(a[2:]) // 2) or apply(*a))
    loss, grads = _loss_and_grads(model, ids)
    forwards = 2 if recompute else 1
    assert sorted(calls) == sorted(([1] * 4 + [2] * 2 + [3] * 2) * forwards)  # projections a node
    ref_loss, ref_grads = _loss_and_grads(alone, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) == 14
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    assert not any(layer.siblings.stopped for _, layer in miss_layers(model) if layer.siblings is not None)


def test_siblings_fed_different_inputs_compute_alone_with_a_warning(caplog):
    model = _llama()
    attn = model.model.layers[0].self_attn
    alone = _unlinked(model).model.layers[0].self_attn
    x, other = torch.randn(2, 3, 64, dtype=torch.float64), torch.randn(2, 3, 64, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="miss_ds.shared_input"):
        q, k = attn.q_proj(x), attn.k_proj(other)
    torch.testing.assert_close(q, alone.q_proj(x), rtol=0, atol=0)
    torch.testing.assert_close(k, alone.k_proj(other), rtol=0, atol=0)
    assert attn.q_proj.siblings.stopped and "do not read one input tensor" in caplog.text
    torch.testing.assert_close(attn.v_proj(x), alone.v_proj(x), rtol=0, atol=0)


def test_merged_or_dropout_siblings_compute_alone(monkeypatch):
    """A merged layer, or dropout in training (a mask per layer, as PEFT draws), leaves each sibling on its own."""
    model = _llama()
    attn = model.model.layers[0].self_attn
    calls = []
    apply = MF._SharedInputMiss.apply
    monkeypatch.setattr(MF._SharedInputMiss, "apply", lambda *a: calls.append(len(a[2:]) // 2) or apply(*a))
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    attn.k_proj.merge()
    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert calls == [1, 1]  # q and v alone; k merged runs as a plain linear
    attn.k_proj.unmerge()
    calls.clear()
    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert calls == [3]


def test_inference_mode_forward_equals_no_grad():
    """Tensors made under torch.inference_mode keep no version counter: the groups still run, with equal logits."""
    model = _llama().eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not any(layer.siblings.stopped for _, layer in miss_layers(model) if layer.siblings is not None)


def test_siblings_called_in_any_order_get_their_own_outputs():
    model = _llama()
    attn = model.model.layers[0].self_attn
    alone = _unlinked(model).model.layers[0].self_attn
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    for name in ("v_proj", "q_proj", "k_proj"):
        torch.testing.assert_close(getattr(attn, name)(x), getattr(alone, name)(x), rtol=0, atol=0)
    assert not attn.q_proj.siblings.stopped


class _FrozenGemms(TorchDispatchMode):
    """Counts the matrix products that read one of ``weights`` (a view of it included)."""

    PRODUCTS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm}

    def __init__(self, weights) -> None:
        super().__init__()
        self.storages = {w.untyped_storage().data_ptr() for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PRODUCTS and any(
                isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["miss", "mini"])
def test_a_recomputed_step_runs_as_many_frozen_gemms_as_the_floor(mode):
    """Non-reentrant activation checkpointing stops a layer's recomputation once every tensor its backward needs is
    saved again: for the frozen floor that is before down_proj's GEMM, which saves nothing it needs. MiSS keeps
    that: its node saves before the frozen products run, so a training step of a recomputed Llama runs the same
    frozen GEMMs as the floor (forward, recompute but the last one, input gradients), the MiSS products aside."""
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    counts = {}
    for variant in ("floor", mode):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config()).double().train()
        model.requires_grad_(False)
        if variant == "floor":
            model.model.norm.weight.requires_grad_(True)
        else:
            apply_miss(model, MissConfig(r=8, mode=mode, mini_r=4, init_weights=False))
        enable_recompute(model, None)
        model.enable_input_require_grads()
        frozen = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "miss_block")]
        with _FrozenGemms(frozen) as counter:
            model(input_ids=ids, labels=ids).loss.backward()
        counts[variant] = counter.count
    layers = tiny_llama_config().num_hidden_layers
    assert counts["floor"] == layers * (7 + 6 + 7) + 2, counts  # the LM head: forward and input gradient
    assert counts[mode] == counts["floor"], counts


class _Aggregations(TorchDispatchMode):
    """Counts the aggregations of x that run: products x E^T with one of the chunk matrices E (r, n) in ``chunks``
    (the spread g E reads E untransposed, (r, n))."""

    def __init__(self, chunks) -> None:
        super().__init__()
        self.chunks = {c.untyped_storage().data_ptr() for c in chunks}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        chunk = args[1] if func.overloadpacket is torch.ops.aten.mm else None
        self.count += chunk is not None and chunk.untyped_storage().data_ptr() in self.chunks and \
            chunk.shape[0] > chunk.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["miss", "mini"])
def test_a_recomputed_layer_keeps_its_aggregations(mode):
    """A recomputed layer takes agg(x) back from its first forward (miss_ds.recompute): a training step of a
    recomputed Llama runs as many aggregations (one an input: 4 a layer) as the same step without recomputation,
    and gives the same loss and D gradients."""
    config = tiny_llama_config()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    chunks = [MF.chunk_matrix(8, n, 0, torch.float64, torch.device("cpu"))
              for n in (config.hidden_size, config.intermediate_size)]
    runs = {}
    for recomputed in (True, False):
        model = _llama(mode).train()
        if recomputed:
            enable_recompute(model, None)
        model.enable_input_require_grads()
        with _Aggregations(chunks) as counter:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        runs[recomputed] = counter.count, loss, {name: m.miss_block.grad for name, m in miss_layers(model)}
    assert runs[False][0] == 4 * config.num_hidden_layers, runs[False][0]
    assert runs[True][0] == runs[False][0], (runs[True][0], runs[False][0])
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=0, atol=0)
    torch.testing.assert_close(runs[True][2], runs[False][2], rtol=0, atol=0)


def test_kept_aggregations_are_released_with_the_step(monkeypatch):
    """What a recomputed layer keeps lives as long as the step's graph: after backward, and after a forward whose
    graph is dropped unused, none of it is left."""
    import gc
    import weakref

    alive = []
    keep = recompute.kept

    def tracked(compute, signature):
        result = keep(compute, signature)
        alive.append(weakref.ref(result))
        return result

    monkeypatch.setattr(recompute, "kept", tracked)
    model = _llama().train()
    enable_recompute(model, None)
    model.enable_input_require_grads()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    unused = model(input_ids=ids, labels=ids).loss
    del unused
    gc.collect()
    assert len(alive) == 3 * 4 * tiny_llama_config().num_hidden_layers  # forward, recompute, forward
    assert not [ref for ref in alive if ref() is not None]


def test_a_recomputation_that_does_not_repeat_the_first_forward_is_an_error():
    """The recomputation takes back what the first forward kept, in order, and refuses a call it did not keep."""
    first, again = recompute.checkpoint_contexts()
    with first:
        kept = recompute.kept(lambda: torch.ones(2), ("aggregate", 2))
    with again:
        assert recompute.kept(lambda: torch.zeros(2), ("aggregate", 2)) is kept
        with pytest.raises(RuntimeError, match=r"asked for MiSS result \('aggregate', 3\) where its first forward kept "
                                               r"nothing \(call 1\)"):
            recompute.kept(lambda: torch.ones(3), ("aggregate", 3))
    assert recompute.kept(lambda: torch.zeros(1), ("aggregate", 1)).sum() == 0  # outside a checkpointed layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 cuBLAS path: needs a GPU (tools/gpu_bench.sh tests)")
@pytest.mark.parametrize("mode", ["miss", "bat"])
def test_bf16_on_gpu_close_to_float64(mode):
    """The cuBLAS path in bf16 (fp32 D, cast in forward) against the same layers in float64: loss and D gradients
    within bf16 rounding. Not ``mini``: its D gradient sums every output tile's share, which cancel to a few percent
    of their size in this tiny random model, so bf16 rounding of the shares (before this change as after, and in any
    bf16 implementation) moves it by O(1); float64 checks it on CPU."""
    model = _llama(mode).cuda()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    ds = {name: layer.miss_block.detach().float() for name, layer in miss_layers(model)}
    model.to(torch.bfloat16)
    for name, layer in miss_layers(model):
        layer.miss_block.data = ds[name]
    loss, grads = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=2e-2, atol=2e-2)  # (HF's loss is fp32)
    for name, grad in grads.items():
        rel = (grad.double() - ref_grads[name]).norm() / ref_grads[name].norm()
        assert grad.dtype == torch.float32 and rel < 5e-2, (name, rel.item())
