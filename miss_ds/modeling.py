"""Build the base causal LM for a run: from a local Hugging Face checkpoint or from a config with random weights."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

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


def build_base_model(cfg: ModelConfig, config: PretrainedConfig, device: torch.device) -> nn.Module:
    """The full base model on ``device``: loaded from ``cfg.path`` or randomly initialised."""
    dtype = DTYPES[cfg.dtype]
    if cfg.path is not None and not cfg.random_init:
        model = AutoModelForCausalLM.from_pretrained(cfg.path, config=config, dtype=dtype)
        return model.to(device)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model
