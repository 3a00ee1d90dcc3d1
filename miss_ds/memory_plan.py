"""Expected GPU memory of a MiSS fine-tune, per GPU, and how many layers can keep their activations.

The model (bf16 weights and activations; sizes in bytes; t = TP size, d = DP size, b = micro-batch, s = seq):
- frozen base: 2 bytes per local parameter (TP-split projections / t; embeddings, LM head, norms whole);
- D (trainable): bf16 parameter and gradient (2 + 2), fp32 master and gradient (4 + 4) and two fp32 Adam moments
  (8): ZeRO-1 splits master/moments/fp32 gradient over d, ZeRO-2 also the bf16 gradient, ZeRO-3 the parameter;
  optimizer offload moves master and moments to the CPU;
- activations of a recomputed layer: its input, 2*b*s*h; a stored layer keeps, per token, both RMSNorm inputs
  (2h), the attention's q, k, v, output and pre-rotary q, k ((3h + 3*kv)/t), and the MLP's gate, up and SiLU
  output (3*inter/t), all bf16;
- the working set of the layer in backward (one stored layer again) and the loss: bf16 logits plus fp32 logits
  and their gradient (2 + 4 + 4 bytes per vocabulary entry per token).
Calibrated on the Llama-2-70B shape on 2 H200s (docs/scale.md): predictions within a few percent of the peaks.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Plan:
    weights: float
    adapter: float
    checkpoints: float
    stored_layers: float
    working: float
    loss: float

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.checkpoints + self.stored_layers + self.working + self.loss

    def rows(self) -> list[tuple[str, float]]:
        return [("frozen weights", self.weights), ("D, grads, optimizer", self.adapter),
                ("layer inputs (checkpoints)", self.checkpoints), ("stored layer activations", self.stored_layers),
                ("backward working set", self.working), ("logits and loss", self.loss), ("total", self.total)]


def local_base_params(m: Shape, tp: int) -> float:
    kv = m.kv_heads * m.head_dim
    split = m.layers * (2 * m.hidden * m.hidden + 2 * m.hidden * kv + 3 * m.hidden * m.intermediate) / tp
    return split + 2 * m.vocab * m.hidden + (2 * m.layers + 1) * m.hidden


def local_d_params(m: Shape, tp: int, r: int, mode: str) -> float:
    """D elements on one rank: column D split with the base (q, k, v, gate, up), row D (o, down) whole."""
    kv = m.kv_heads * m.head_dim
    if mode == "mini":
        return 7 * m.layers * r * r
    column = (m.hidden + 2 * kv + 2 * m.intermediate) / tp  # bat: (out/r) blocks of r x r, the same count
    return m.layers * r * (column + 2 * m.hidden)


def layer_activation_bytes(m: Shape, tp: int, tokens: int) -> float:
    kv = m.kv_heads * m.head_dim
    per_token = 2 * m.hidden + (3 * m.hidden + 3 * kv) / tp + 3 * m.intermediate / tp
    return 2 * per_token * tokens


def plan(m: Shape, tp: int, dp: int, zero: int, offload: bool, micro_batch: int, seq: int, recompute: int,
         r: int = 64, mode: str = "miss", adapter: bool = True) -> Plan:
    """Bytes per GPU, by component; ``recompute`` = how many layers recompute (the others store activations)."""
    tokens = micro_batch * seq
    d = local_d_params(m, tp, r, mode) if adapter else 0.0
    master = 0.0 if offload else 16 * d / (dp if zero >= 1 else 1)  # fp32 master, fp32 grad, two moments
    adapter_bytes = 2 * d / (dp if zero >= 3 else 1) + 2 * d / (dp if zero >= 2 else 1) + master
    layer = layer_activation_bytes(m, tp, tokens)
    stored = m.layers - recompute
    return Plan(weights=2 * local_base_params(m, tp), adapter=adapter_bytes,
                checkpoints=2 * tokens * m.hidden * recompute, stored_layers=layer * stored,
                working=layer, loss=10 * tokens * m.vocab)


def shape_of(config) -> Shape:
    """The planning shape of a Hugging Face decoder config."""
    return Shape(config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                 getattr(config, "num_key_value_heads", None) or config.num_attention_heads, config.vocab_size)


def layers_to_recompute(m: Shape, budget_bytes: float, **kw) -> int:
    """The fewest recomputed layers whose plan fits in ``budget_bytes`` (all layers when none fits)."""
    for recompute in range(0, m.layers + 1):
        if plan(m, recompute=recompute, **kw).total <= budget_bytes:
            return recompute
    return m.layers
