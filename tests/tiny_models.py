"""Tiny random-weight configs of every supported family (and Llama variants), as ``model.config`` fields.

Each is a few layers at hidden 64, with what makes the family differ: GQA with uneven head splits, rope scaling,
biases, per-head or whole-projection q/k norms, fused projections, soft-capping and sliding windows, MoE experts.
"""
from __future__ import annotations

from typing import Any

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=97, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

TINY: dict[str, dict[str, Any]] = {
    # 6 query / 3 KV heads: TP=2 splits them [4, 2] / [2, 1]; Llama 3 rope scaling.
    "llama": dict(COMMON, model_type="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32}),
    # 5 heads (MHA): TP=2 splits them [3, 2].
    "llama-5-heads": dict(COMMON, model_type="llama", hidden_size=40, num_attention_heads=5, num_key_value_heads=5),
    "mistral": dict(COMMON, model_type="mistral"),
    "qwen2": dict(COMMON, model_type="qwen2"),
    "qwen3": dict(COMMON, model_type="qwen3", head_dim=16),
    "gemma2": dict(COMMON, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=4),
    "gemma3_text": dict(COMMON, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"]),
    "olmo2": dict(COMMON, model_type="olmo2"),
    "phi3": dict(COMMON, model_type="phi3"),
    "gpt_neox": dict(COMMON, model_type="gpt_neox", rotary_pct=0.5),
    "mixtral": dict(COMMON, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(COMMON, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(COMMON, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
}
for fields in TINY.values():
    if fields["model_type"] == "gpt_neox":
        del fields["num_key_value_heads"]


def tiny_config(name: str, **overrides: Any):
    """The tiny config ``name`` (a key of TINY), built as a run builds it (``modeling.hf_config``), eager attention."""
    from miss_ds.modeling import hf_config
    from miss_ds.run_config import ModelConfig

    return hf_config(ModelConfig(config={**TINY[name], **overrides}, attn_implementation="eager"))
