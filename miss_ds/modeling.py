"""The base model's Hugging Face config for a run: a local checkpoint's, or one built from fields (random weights)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from .run_config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_config(cfg: ModelConfig, vocab_size: int | None = None) -> PretrainedConfig:
    """The model's config: ``path``'s config.json with ``config`` overrides, or ``config`` alone (model_type required)."""
    overrides = dict(cfg.config)
    if cfg.path is not None:
        config = AutoConfig.from_pretrained(cfg.path)
    else:
        model_type = overrides.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.config needs 'model_type' (e.g. llama) when model.path is null")
        config = AutoConfig.for_model(model_type)
    for key, value in overrides.items():
        setattr(config, key, value)
    if cfg.path is None and vocab_size is not None and "vocab_size" not in cfg.config:
        config.vocab_size = vocab_size
    config.use_cache = False
    config._attn_implementation = cfg.attn_implementation
    return config


def enable_recompute(model: nn.Module, layers: int | None) -> int:
    """Activation checkpointing on the first ``layers`` decoder layers (all when None); returns how many.

    Recomputing a layer trades its stored activations for a second forward pass in backward; when memory
    allows, leaving the last layers stored makes a step faster (tools/plan_memory.py says how many fit).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = len(blocks) if layers is None else max(0, min(layers, len(blocks)))
    for block in blocks[count:]:
        block.gradient_checkpointing = False
    return count
