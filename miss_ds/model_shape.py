"""The shape of a decoder and its parameter counts: the one source of them for the memory plan (``memory_plan``),
MFU (``flops``) and the communication model (``tools/traffic.py``).

head_dim is the config's ``head_dim`` when set, else hidden // heads (transformers' default). A layer's linears are
its family's (:mod:`miss_ds.families`): Llama's q, k, v (hidden -> heads or kv_heads x head_dim), o, gate, up, down;
Phi-3's fused qkv_proj and gate_up_proj; GPT-NeoX's query_key_value, dense and its two-matrix MLP; MoE families'
attention, Qwen2-MoE's shared expert, and the routed experts (each a gated MLP of ``expert_intermediate``; every
layer counted as an MoE layer). Under TP the family's column projections are split along out and the row ones
along in, routed experts along their intermediate width; local counts are the average shard (uneven splits
ignored). Adapter counts assume MiSS on the family's default targets. Norm weights are counted as Llama's (two per
layer and a final one; other families differ by a few vectors of hidden size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .families import FAMILIES, family_of, head_counts, routed_experts
from .fp8 import fp8_capable


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: Optional[int] = None
    """None: hidden // heads."""
    tied_embeddings: bool = False
    """The LM head is the input embedding (one vocab x hidden matrix stored)."""
    model_type: str = "llama"
    """The family (``miss_ds.families``): which linears a layer has and how TP splits them."""
    experts: int = 0
    """Routed experts per layer (MoE)."""
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    """Width of Qwen2-MoE's shared expert (a gated MLP in every layer, with a one-output gate)."""

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a Hugging Face decoder config of a supported family."""
        family = family_of(config)
        heads, kv_heads, head_dim = head_counts(config)
        experts = routed_experts(config)
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=getattr(config, "intermediate_size", 0) or 0, heads=heads, kv_heads=kv_heads,
                   vocab=config.vocab_size, head_dim=head_dim,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), model_type=family.model_type,
                   experts=experts, experts_per_token=getattr(config, "num_experts_per_tok", 0) if experts else 0,
                   expert_intermediate=getattr(config, family.experts.intermediate) if experts else 0,
                   shared_intermediate=getattr(config, "shared_expert_intermediate_size", 0) or 0)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """Intermediate features a token computes in one layer's MLP: the dense MLP's, or its routed experts' and the
        shared expert's."""
        return self.experts_per_token * self.expert_intermediate + self.shared_intermediate if self.experts \
            else self.intermediate

    def style(self, name: str) -> Optional[str]:
        """How TP splits projection ``name``: "column", "row", or None (whole on every rank)."""
        return FAMILIES[self.model_type].tp_style(name)

    def projections(self, tp: int = 1) -> dict[str, tuple[float, float]]:
        """(in_features, out_features) of each linear of one layer (routed experts apart), as one of ``tp`` ranks
        holds it."""
        h, q, kv, inter, shared = self.hidden, self.q_dim, self.kv_dim, self.intermediate, self.shared_intermediate
        attention = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        mlp = {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        full = {
            "phi3": {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter),
                     "down_proj": (inter, h)},
            "gpt_neox": {"query_key_value": (h, 3 * q), "dense": (q, h), "dense_h_to_4h": (h, inter),
                         "dense_4h_to_h": (inter, h)},
            "mixtral": attention, "qwen3_moe": attention,
            "qwen2_moe": {**attention, "gate_proj": (h, shared), "up_proj": (h, shared), "down_proj": (shared, h),
                          "shared_expert_gate": (h, 1)},
        }.get(self.model_type, {**attention, **mlp})
        if tp == 1:
            return full
        return {name: (i, o / tp) if self.style(name) == "column" else (i / tp, o) if self.style(name) == "row"
                else (i, o) for name, (i, o) in full.items()}

    def expert_params(self, tp: int = 1, active: bool = False) -> float:
        """Routed-expert weights of one layer on one of ``tp`` ranks (gate, up and down of each expert, split along
        the expert width, plus the router); ``active``: only the experts one token is sent to."""
        if not self.experts:
            return 0.0
        count = self.experts_per_token if active else self.experts
        return count * 3 * self.hidden * self.expert_intermediate / tp + self.experts * self.hidden

    def layer_linear_params(self, tp: int = 1) -> float:
        """Stored weights of one layer's linears and routed experts on one of ``tp`` ranks."""
        return sum(i * o for i, o in self.projections(tp).values()) + self.expert_params(tp)

    def linear_params(self) -> int:
        """Weights of every matrix product a token goes through: all projections, the routed experts it is sent to
        and the LM head (embeddings are lookups)."""
        per_layer = sum(i * o for i, o in self.projections().values()) + self.expert_params(active=True)
        return int(self.layers * per_layer) + self.vocab * self.hidden

    def base_params(self, tp: int = 1) -> float:
        """Frozen parameters on one of ``tp`` ranks: projections and experts split, the embedding, LM head (unless
        tied) and norm weights whole."""
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden
        return self.layers * self.layer_linear_params(tp) + embeddings + (2 * self.layers + 1) * self.hidden

    def _fp8_projections(self, tp: int) -> list[tuple[int, int]]:
        """(in, out) of a layer's projections an FP8 base (``model.base_precision: fp8``) quantises on one of ``tp``
        ranks: those MiSS adapts by default whose shard FP8 GEMMs can run (``fp8.fp8_capable``; a shared-input
        group kept whole in bf16 for one member's sake is not modelled)."""
        targets = FAMILIES[self.model_type].targets
        return [(i, o) for name, (i, o) in self.projections(tp).items() if name in targets and fp8_capable(i, o)]

    def fp8_params(self, tp: int = 1) -> float:
        """Weight elements an FP8 base holds in e4m3 on one of ``tp`` ranks."""
        return self.layers * sum(i * o for i, o in self._fp8_projections(tp))

    def fp8_scales(self, tp: int = 1) -> float:
        """fp32 scales an FP8 base keeps on one of ``tp`` ranks: one per output row of each FP8 projection, and
        its input-gradient GEMM's unit column scales, one per input column (``fp8.FP8Weight``)."""
        return self.layers * sum(i + o for i, o in self._fp8_projections(tp))

    def adapter_params(self, r: int, mode: str = "miss", mini_r: int = 1, tp: int = 1) -> float:
        """D elements on one of ``tp`` ranks with MiSS on the family's default targets. ``miss``: r x out; ``bat``:
        out/r blocks of r x r, the same count; both split with a column projection's out and whole (replicated) on
        row ones. ``mini``: r x mini_r, whole on every rank."""
        targets = FAMILIES[self.model_type].targets
        outs = [o for name, (_, o) in self.projections(tp).items() if name in targets]
        if mode == "mini":
            return len(outs) * self.layers * r * mini_r
        return self.layers * r * sum(outs)


#: Shapes of popular checkpoints, for planning without their files (``tools/plan_memory.py --shape``): the fields
#: of their config.json.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "llama-2-13b": ModelShape(layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32000),
    "llama-2-70b": ModelShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000),
    "llama-3-8b": ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "llama-3-70b": ModelShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=128256),
    "mistral-7b": ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000),
    "qwen2-7b": ModelShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064),
    "qwen2-72b": ModelShape(layers=80, hidden=8192, intermediate=29568, heads=64, kv_heads=8, vocab=152064),
}


def known_shape(name: str) -> Optional[ModelShape]:
    """The known shape whose key ``name`` contains (e.g. a checkpoint directory ``Llama-2-70b-hf``), else None."""
    name = name.lower().replace("_", "-")
    matches = [key for key in KNOWN_SHAPES if key in name]
    return KNOWN_SHAPES[max(matches, key=len)] if matches else None
