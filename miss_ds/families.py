"""The model families miss_ds supports, one record per Hugging Face ``model_type``: every fact about a family that
miss_ds's code depends on lives here, and the code reads it from here.

A :class:`Family` gives the projections MiSS adapts by default (as PEFT keeps a mapping per model type), the tensor
parallel plan (column or row per projection name; for a fused projection the widths of its parts in order, each
split as that projection alone would be), the names under which checkpoints store tensors that the module tree
names otherwise (GPT-NeoX's ``embed_out``, Mixtral's ``block_sparse_moe``, per-expert weights of MoE models), and
what its attention does with full widths under TP. :data:`REFUSED` names the model types refused outright and why.
:data:`SUPPORT` is the support matrix; the README's table is generated from it and the tests check both.

The code reads these records through :func:`family_of`, which refuses model types miss_ds does not support; it and
:func:`check_tp` need only the config, so refusals come before any model memory is spent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

Style = Literal["column", "row"]

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PLAN: Mapping[str, Style] = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row"}
LLAMA_PLAN: Mapping[str, Style] = {**ATTENTION_PLAN, "gate_proj": "column", "up_proj": "column", "down_proj": "row"}


class UnsupportedModel(ValueError):
    """A model family, or a family at a TP size, that miss_ds does not support; the message says what works."""


def head_counts(config: Any) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of a decoder config (GPT-NeoX has no KV-head or head_dim field)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _qkv_widths(config: Any) -> tuple[int, ...]:
    heads, kv, head_dim = head_counts(config)
    return heads * head_dim, kv * head_dim, kv * head_dim


def _gate_up_widths(config: Any) -> tuple[int, ...]:
    return config.intermediate_size, config.intermediate_size


@dataclass(frozen=True)
class Experts:
    """Routed experts that transformers keeps as fused 3-D parameters of one module (``<block>.experts``):
    ``gate_up_proj`` (experts, 2 x inter, hidden) with gate and up stacked along out, ``down_proj`` (experts,
    hidden, inter). Checkpoints hold them per expert as 2-D weights: ``files`` maps each parameter to the names of
    its parts in the checkpoint, ``<block>.experts.<e>.<name>.weight``, concatenated along out."""

    files: Mapping[str, tuple[str, ...]]
    intermediate: str
    """The config field of one expert's intermediate width."""
    count: str
    """The config field of the number of routed experts."""


@dataclass(frozen=True)
class Family:
    """Everything miss_ds needs to know about one model family (see the module docstring)."""

    model_type: str
    name: str
    targets: tuple[str, ...]
    """Projections MiSS adapts when ``miss.target_modules`` is not set: attention and (dense or shared) MLP."""
    tp_plan: Mapping[str, Style]
    """Projection (last name component) -> how TP splits it; projections not named stay whole on every rank."""
    fused: Mapping[str, Callable[[Any], tuple[int, ...]]] = field(default_factory=dict)
    """Fused column projection -> the widths of its parts in order, from the config (Phi-3's qkv_proj: q, k, v)."""
    renames: Mapping[str, str] = field(default_factory=dict)
    """Module-tree name component -> the checkpoint's name for it, where checkpoints name tensors otherwise."""
    experts: Optional[Experts] = None
    """Routed MoE experts: split over TP, read per expert from checkpoints, not adapted."""
    full_width_norms: Mapping[str, str] = field(default_factory=dict)
    """Norm -> the projection whose whole output it normalises (OLMo2's q_norm over all heads): under TP its weight
    is split as that projection and its mean square is summed over the TP group."""
    heads_from_config: bool = False
    """The attention reads its head counts from the model config in forward (Phi-3 slices q/k/v of the fused
    output by them): under TP it is given a view of the config with its rank's counts."""
    attention_note: str = ""
    """Why transformers refuses an attention implementation for this family (said when one is asked for)."""
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    """Projections (last name components) of one parent module that read the same input tensor (q, k and v; gate
    and up): their MiSS products are computed together (:mod:`miss_ds.shared_input`)."""
    liger: bool = False
    """``model.kernels: liger`` is allowed (:mod:`miss_ds.fused_kernels`): Liger Kernel patches this family and
    ``tests/test_fused_kernels_gpu.py`` finds its losses and gradients equal to transformers' code on a GPU."""

    def tp_style(self, module_name: str) -> Optional[Style]:
        """How the plan splits module ``module_name`` (by its last name component); None: replicated."""
        return self.tp_plan.get(module_name.rpartition(".")[2])

    def fused_widths(self, module_name: str, config: Any) -> Optional[tuple[int, ...]]:
        """The part widths of a fused projection, None for a plain one."""
        widths = self.fused.get(module_name.rpartition(".")[2])
        return None if widths is None else widths(config)

    def file_key(self, model_key: str) -> str:
        """The checkpoint key of the tensor the module tree calls ``model_key`` (a routed-expert parameter has
        several: :meth:`expert_file_keys`)."""
        return ".".join(self.renames.get(part, part) for part in model_key.split("."))

    def expert_file_keys(self, param_key: str, config: Any) -> Optional[list[list[str]]]:
        """The checkpoint keys of a routed-expert parameter (``<block>.experts.gate_up_proj``), [expert][part]:
        ``<block>.experts.<e>.<part>.weight``; None for any other parameter."""
        block, _, name = param_key.rpartition(".experts.")
        if self.experts is None or not block or name not in self.experts.files:
            return None
        block = self.file_key(block)
        return [[f"{block}.experts.{e}.{part}.weight" for part in self.experts.files[name]]
                for e in range(getattr(config, self.experts.count))]


QKV_INPUT = ("q_proj", "k_proj", "v_proj")
LLAMA_LIKE = dict(targets=ATTENTION + GATED_MLP, tp_plan=LLAMA_PLAN, shared_inputs=(QKV_INPUT, ("gate_proj", "up_proj")))
MOE_EXPERTS = Experts(files={"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
                      intermediate="moe_intermediate_size", count="num_experts")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", **LLAMA_LIKE, liger=True),
    Family("mistral", "Mistral", **LLAMA_LIKE, liger=True),
    Family("qwen2", "Qwen2", **LLAMA_LIKE, liger=True),
    Family("qwen3", "Qwen3", **LLAMA_LIKE, liger=True),
    Family("gemma2", "Gemma2", **LLAMA_LIKE, liger=True, attention_note="sdpa has no logit soft-capping"),
    Family("gemma3_text", "Gemma3 (text)", **LLAMA_LIKE, liger=True),
    Family("olmo2", "OLMo2", **LLAMA_LIKE, liger=True, full_width_norms={"q_norm": "q_proj", "k_norm": "k_proj"}),
    Family("phi3", "Phi-3", targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
           tp_plan={"qkv_proj": "column", "o_proj": "row", "gate_up_proj": "column", "down_proj": "row"},
           fused={"qkv_proj": _qkv_widths, "gate_up_proj": _gate_up_widths}, heads_from_config=True, liger=True),
    # query_key_value interleaves q, k, v per head ([q_h; k_h; v_h] for each head h), so a head-aligned
    # contiguous split gives each rank whole heads with their q, k and v: a plain column split.
    Family("gpt_neox", "GPT-NeoX", targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
           tp_plan={"query_key_value": "column", "dense": "row", "dense_h_to_4h": "column", "dense_4h_to_h": "row"},
           renames={"lm_head": "embed_out"}),
    Family("mixtral", "Mixtral", targets=ATTENTION, tp_plan=ATTENTION_PLAN, renames={"mlp": "block_sparse_moe"},
           shared_inputs=(QKV_INPUT,), liger=True,
           experts=Experts(files={"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)},
                           intermediate="intermediate_size", count="num_local_experts")),
    Family("qwen2_moe", "Qwen2-MoE", **LLAMA_LIKE, experts=MOE_EXPERTS),
    Family("qwen3_moe", "Qwen3-MoE", **LLAMA_LIKE, liger=True, experts=MOE_EXPERTS),
)}

#: Model types refused outright, with the reason.
REFUSED: dict[str, str] = {
    "gpt2": "GPT-2's projections are Conv1D layers (weights stored transposed, q/k/v fused in c_attn), which MiSS's "
            "linear layers cannot wrap",
}


def family_of(config: Any) -> Family:
    """The family of a model config; refuses model types miss_ds does not support, naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    reason = REFUSED.get(model_type, "miss_ds has no tested support for it (its TP plan, default targets and "
                                     "checkpoint layout are unknown)")
    raise UnsupportedModel(f"model_type {model_type!r} is not supported: {reason}. Supported: "
                           f"{', '.join(f'{f.name} ({t})' for t, f in FAMILIES.items())}")


def default_targets(config: Any) -> list[str]:
    """The projections MiSS adapts in a model of this config when ``miss.target_modules`` is not set."""
    return list(family_of(config).targets)


def check_tp(config: Any, tp: int, world: Optional[int] = None, key: str = "parallel.tp_size") -> None:
    """Refuse a TP size the family's attention cannot be split over: each rank needs at least one whole key/value
    head with its query heads (uneven head counts are fine; KV heads are not replicated). Names the sizes that
    work (those dividing ``world`` when given), calling the size ``key`` (a config key, or a tool's flag)."""
    family = family_of(config)
    heads, kv, _ = head_counts(config)
    if tp <= kv:
        return
    fits = [t for t in range(1, kv + 1) if world is None or world % t == 0]
    raise UnsupportedModel(
        f"{key}={tp} is more than the {kv} key/value heads of this {family.name} model ({heads} query "
        f"heads): each TP rank needs at least one whole key/value head with its query heads, and miss_ds does not "
        f"replicate key/value heads. Use {key} in {fits}" + (f" (on {world} ranks)" if world else ""))


def routed_experts(config: Any) -> int:
    """The number of routed experts per MoE layer (0 for a dense family)."""
    experts = family_of(config).experts
    return 0 if experts is None else getattr(config, experts.count)


# ----------------------------------------------------------------------------------------------- support matrix
#: How each family is supported, one row per family: training at TP=1 and at TP>1 (TP=2 equal to TP=1 step by
#: step), per-rank loading from a ``save_pretrained`` checkpoint, and export (merged and PEFT, loaded back with
#: equal logits), and what is particular to it. ``tests/test_families.py`` runs every "yes" cell
#: (``tests/dist/families.py``) and every refusal; README.md's table is :func:`support_table`, with a column for
#: the fused kernels (``Family.liger``, tested on a GPU by ``tests/test_fused_kernels_gpu.py``).
SUPPORT_COLUMNS = ("TP=1", "TP>1", "load checkpoint", "export merged / PEFT")
SUPPORT: dict[str, tuple[tuple[str, str, str, str], str]] = {
    "llama": (("yes",) * 4, "Llama 2/3 (rope scaling); uneven head splits (5 heads; 6 heads / 3 KV)"),
    "mistral": (("yes",) * 4, ""),
    "qwen2": (("yes",) * 4, "Qwen2 and Qwen2.5 (q/k/v biases)"),
    "qwen3": (("yes",) * 4, "per-head q/k norms"),
    "gemma2": (("yes",) * 4, "eager attention by default (sdpa refused: no logit soft-capping)"),
    "gemma3_text": (("yes",) * 4, "Gemma3ForCausalLM; sliding and full attention layers"),
    "olmo2": (("yes",) * 4, "q/k norms over all heads: their mean square is summed over the TP ranks"),
    "phi3": (("yes",) * 4, "fused qkv_proj (q, k, v) and gate_up_proj (gate, up) split per part, D with them"),
    "gpt_neox": (("yes",) * 4, "Pythia; query_key_value interleaved per head; checkpoints name the head embed_out"),
    "mixtral": (("yes",) * 4, "routed experts split over TP, not adapted (reported); router trainable as "
                              "modules_to_save"),
    "qwen2_moe": (("yes",) * 4, "shared expert adapted; routed experts split over TP, not adapted (reported)"),
    "qwen3_moe": (("yes",) * 4, "routed experts split over TP, not adapted (reported)"),
    "gpt2": (("refused",) * 4, REFUSED["gpt2"]),
}


def support_table() -> str:
    """The support matrix as a Markdown table (README.md holds exactly this)."""
    header = ("family (`model_type`)", *SUPPORT_COLUMNS, "`model.kernels: liger`", "MiSS by default on", "notes")
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for model_type, (cells, notes) in SUPPORT.items():
        family = FAMILIES.get(model_type)
        name = family.name if family else "GPT-2"
        targets = ", ".join(f"`{t}`" for t in family.targets) if family else "-"
        liger = "yes" if family and family.liger else "-"
        rows.append(f"| {name} (`{model_type}`) | " + " | ".join((*cells, liger, targets, notes)) + " |")
    return "\n".join(rows)
