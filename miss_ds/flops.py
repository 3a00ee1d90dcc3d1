"""Model FLOPs of a frozen-base fine-tune, for MFU.

Per token, a decoder's forward pass costs F = 2 * P + 4 * L * s * d: two FLOPs per weight of every matrix
product (P: all linear weights, LM head included; embeddings are lookups) plus the two attention products
(QK^T and AV, each 2 * s * d per token per layer, causal masking not discounted, as in the PaLM MFU).
Training with the base frozen runs the forward and the input-gradient backward (the same cost again) and no
weight gradient, so a step costs 2 F per token. MiSS's own work (r/in of the base) and activation recompute are
not counted: MFU measures useful work. MFU = 2 F * tokens/s per GPU / the GPU's dense peak.
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

#: Dense peak FLOP/s by device name fragment (vendor datasheets; H100 SXM and H200 share the compute die).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def linear_params(config: PretrainedConfig) -> int:
    """Weights of every matrix product of a Llama-style decoder (attention, MLP, LM head)."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = d * config.num_attention_heads * head_dim
    kv = 2 * d * config.num_key_value_heads * head_dim
    o = config.num_attention_heads * head_dim * d
    mlp = 3 * d * inter
    return layers * (q + kv + o + mlp) + d * config.vocab_size


def frozen_finetune_flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    forward = 2 * linear_params(config) + 4 * config.num_hidden_layers * seq_len * config.hidden_size
    return 2 * forward


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The accelerator's dense peak for ``dtype``; infinite on CPU, so MFU reads 0 there."""
    if device.type != "cuda":
        return float("inf")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
