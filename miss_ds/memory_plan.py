"""Expected GPU memory of a MiSS fine-tune, per GPU, and how many layers can keep their activations.

The model (bf16 weights and activations; sizes in bytes; t = TP size, d = DP size, b = micro-batch, s = seq;
parameter counts and q = heads * head_dim, kv = kv_heads * head_dim from ``miss_ds.model_shape``):
- frozen base: 2 bytes per local parameter (TP-split projections / t; embeddings, LM head, norms whole); with an FP8
  base (``model.base_precision: fp8``) the adapted projections hold 1 byte per element (``ModelShape.fp8_params``)
  plus 4 bytes per fp32 scale (``ModelShape.fp8_scales``); the transients of one projection's FP8 products (the
  per-token quantised input or output gradient and, in backward, the transposed weight, 1 byte per element) are
  not counted;
- D (trainable, MiSS on all seven projections; ``mini``'s r x mini_r D whole on every rank): bf16 parameter and
  gradient (2 + 2), fp32 master and gradient (4 + 4) and two fp32 Adam moments (8): ZeRO-1 splits
  master/moments/fp32 gradient over d, ZeRO-2 also the bf16 gradient (ZeRO-3 is refused: run_config.ZERO3_REFUSAL);
  optimizer offload moves master and moments to the CPU;
- activations of a recomputed layer: its input, 2*b*s*h; a stored layer keeps, per token, both RMSNorm inputs
  (2h), the attention's q, k, v, output and pre-rotary q, k ((3q + 3kv)/t), and the MLP's gate, up and SiLU
  output (3*inter/t; inter the features a token computes: ``ModelShape.mlp_width``), all bf16; with Liger's
  kernels (``model.kernels: liger``) the rotary embedding works in place and SwiGLU keeps only gate and up:
  (2q + 2kv)/t and 2*inter/t;
- the working set of the layer in backward (one stored layer again) and the loss: bf16 logits plus fp32 logits
  and their gradient (2 + 4 + 4 bytes per vocabulary entry per token); Liger's fused linear cross-entropy holds
  no logits, only the hidden states' gradient and one chunk of about tokens x hidden logits (8 bytes per token
  per hidden feature).
Calibrated on the Llama-2-70B shape on 2 H200s (docs/scale.md): predictions within a few percent of the peaks;
the Liger terms on one H200 (80 layers, FP8 base, 63 recomputed: 104.1 GiB measured).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model_shape import ModelShape

GIB = 2**30
#: Share of the accelerator's memory that ``recompute_layers: auto`` plans for (the rest: allocator slack, NCCL).
AUTO_MEMORY_FRACTION = 0.85


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


def layer_activation_bytes(m: ModelShape, tp: int, tokens: int, kernels: str = "hf") -> float:
    """Bytes a stored layer keeps for backward (the module docstring's terms)."""
    kept = 2 if kernels == "liger" else 3  # Liger: no pre-rotary q, k; no SiLU output
    per_token = 2 * m.hidden + kept * (m.q_dim + m.kv_dim) / tp + kept * m.mlp_width / tp
    return 2 * per_token * tokens


def loss_bytes(m: ModelShape, tokens: int, kernels: str = "hf") -> float:
    """Bytes of the logits and the loss (the module docstring's terms)."""
    return 8 * tokens * m.hidden if kernels == "liger" else 10 * tokens * m.vocab


def weight_bytes(m: ModelShape, tp: int, base_precision: str = "bf16") -> float:
    """Bytes of the frozen base on one of ``tp`` ranks: 2 per parameter; with ``fp8`` 1 per FP8 projection element
    and 4 per scale."""
    if base_precision != "fp8":
        return 2 * m.base_params(tp)
    return 2 * m.base_params(tp) - m.fp8_params(tp) + 4 * m.fp8_scales(tp)


def plan(m: ModelShape, tp: int, dp: int, zero: int, offload: bool, micro_batch: int, seq: int, recompute: int,
         r: int = 64, mode: str = "miss", mini_r: int = 1, adapter: bool = True, base_precision: str = "bf16",
         kernels: str = "hf") -> Plan:
    """Bytes per GPU, by component; ``recompute`` = how many layers recompute (the others store activations)."""
    tokens = micro_batch * seq
    d = m.adapter_params(r, mode, mini_r, tp) if adapter else 0.0
    master = 0.0 if offload else 16 * d / (dp if zero >= 1 else 1)  # fp32 master, fp32 grad, two moments
    adapter_bytes = 2 * d + 2 * d / (dp if zero >= 2 else 1) + master
    layer = layer_activation_bytes(m, tp, tokens, kernels)
    stored = m.layers - recompute
    return Plan(weights=weight_bytes(m, tp, base_precision), adapter=adapter_bytes,
                checkpoints=2 * tokens * m.hidden * recompute, stored_layers=layer * stored,
                working=layer, loss=loss_bytes(m, tokens, kernels))


def layers_to_recompute(m: ModelShape, budget_bytes: float, **kw: Any) -> int:
    """The fewest recomputed layers whose plan (``kw``: ``plan``'s arguments) fits in ``budget_bytes`` (all
    layers when none fits)."""
    for recompute in range(0, m.layers + 1):
        if plan(m, recompute=recompute, **kw).total <= budget_bytes:
            return recompute
    return m.layers


def auto_recompute_layers(m: ModelShape, gpu_bytes: float, *, tp: int, dp: int, zero: int, offload: bool,
                          micro_batch: int, seq: int, r: int, mode: str, mini_r: int, base_precision: str = "bf16",
                          kernels: str = "hf") -> int:
    """``recompute_layers: auto``: the fewest recomputed layers whose plan fits in ``AUTO_MEMORY_FRACTION`` of
    ``gpu_bytes`` (one accelerator's memory)."""
    return layers_to_recompute(m, AUTO_MEMORY_FRACTION * gpu_bytes, tp=tp, dp=dp, zero=zero, offload=offload,
                               micro_batch=micro_batch, seq=seq, r=r, mode=mode, mini_r=mini_r,
                               base_precision=base_precision, kernels=kernels)
