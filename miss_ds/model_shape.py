"""The shape of a Llama-style decoder and its parameter counts: the one source of them for the memory plan
(``memory_plan``), MFU (``flops``) and the communication model (``tools/traffic.py``).

head_dim is the config's ``head_dim`` when set, else hidden // heads (transformers' Llama default). So q is
hidden -> heads * head_dim, k and v hidden -> kv_heads * head_dim, o heads * head_dim -> hidden. Under TP the
column projections (q, k, v, gate, up) are split along out and the row ones (o, down) along in; local counts
are the average shard (uneven splits ignored). Adapter counts assume MiSS on all seven projections.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

#: Projections split along out under TP (column-parallel) and along in (row-parallel).
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


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

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a Hugging Face decoder config (Llama, Mistral, Qwen2)."""
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size, head_dim=getattr(config, "head_dim", None),
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self, tp: int = 1) -> dict[str, tuple[float, float]]:
        """(in_features, out_features) of each projection of one layer, as one of ``tp`` ranks holds it."""
        h, q, kv, inter = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        full = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        if tp == 1:
            return full
        return {name: (i, o / tp) if name in COLUMN else (i / tp, o) for name, (i, o) in full.items()}

    def layer_linear_params(self, tp: int = 1) -> float:
        """Weights of one layer's seven projections on one of ``tp`` ranks."""
        return sum(i * o for i, o in self.projections(tp).values())

    def linear_params(self) -> int:
        """Weights of every matrix product of the model: all projections and the LM head (embeddings are lookups)."""
        return self.layers * int(self.layer_linear_params()) + self.vocab * self.hidden

    def base_params(self, tp: int = 1) -> float:
        """Frozen parameters on one of ``tp`` ranks: projections split, the embedding, LM head (unless tied) and
        RMSNorm weights (two a layer, one final) whole."""
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab * self.hidden
        return self.layers * self.layer_linear_params(tp) + embeddings + (2 * self.layers + 1) * self.hidden

    def adapter_params(self, r: int, mode: str = "miss", mini_r: int = 1, tp: int = 1) -> float:
        """D elements on one of ``tp`` ranks. ``miss``: r x out; ``bat``: out/r blocks of r x r, the same count;
        both split with a column projection's out and whole (replicated) on row ones. ``mini``: r x mini_r,
        whole on every rank."""
        if mode == "mini":
            return len(COLUMN + ROW) * self.layers * r * mini_r
        return self.layers * r * sum(out for _, out in self.projections(tp).values())


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
