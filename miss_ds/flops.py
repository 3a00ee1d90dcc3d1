"""Model FLOPs of a frozen-base fine-tune, for MFU.

Per token, a decoder's forward pass costs F = 2 * P + 4 * L * s * q: two FLOPs per weight of every matrix
product a token goes through (P: the linear weights, LM head included, of an MoE only the experts a token is sent to;
embeddings are lookups; ``ModelShape.linear_params``) plus the
two attention products (QK^T and AV, each 2 * s * q per token per layer with q = heads * head_dim, causal masking
not discounted, as in the PaLM MFU). With the base frozen, backward computes input gradients only: the linear
layers cost 2 * P again, no weight gradient. A step is counted as 2 F per token, so the attention products'
backward, which costs twice their forward (both operands are activations), is counted at the forward's cost:
the count is 4 * L * s * q per token short (3.5% of a step's FLOPs at the Llama-2-70B shape, seq 4096) and MFU
reads that much low. MiSS's own work (r/in of the base) and activation recompute are not counted: MFU measures
useful work. MFU = 2 F * tokens/s per GPU / the GPU's dense peak.
"""
from __future__ import annotations

import torch
from transformers import PretrainedConfig

from .model_shape import ModelShape

#: Dense peak FLOP/s by device name fragment (vendor datasheets; H100 SXM and H200 share the compute die).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def frozen_finetune_flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """2 F (see the module docstring) for a Hugging Face decoder config at sequence length ``seq_len``."""
    m = ModelShape.from_config(config)
    forward = 2 * m.linear_params() + 4 * m.layers * seq_len * m.q_dim
    return 2 * forward


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The accelerator's dense peak for ``dtype``; infinite on CPU, so MFU reads 0 there."""
    if device.type != "cuda":
        return float("inf")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
