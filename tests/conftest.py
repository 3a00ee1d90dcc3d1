"""Shared test helpers: tiny random models and a CPU DeepSpeed environment."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs root and a local Slurm / OpenMPI (tools/local_cluster.sh)")


def tiny_llama_config(**overrides):
    """A tiny Llama whose MLP shards are ragged for r=8 (intermediate 100: TP=2 shards of 50, TP=4 of 25)."""
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def hf_base(tmp_path_factory):
    """The default config's tiny Llama as a Hugging Face checkpoint: a base whose weights, unlike the random base's
    (drawn per TP shard), are the same for every tp_size."""
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaForCausalLM

    from miss_ds.modeling import hf_config
    from miss_ds.run_config import load_config

    root = Path(__file__).resolve().parents[1]
    model_cfg = load_config(root / "configs/tiny-cpu.yaml").model
    vocab = len(AutoTokenizer.from_pretrained(root / "data/arith/tokenizer"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_base") / "llama"
    LlamaForCausalLM(hf_config(model_cfg, vocab_size=vocab)).save_pretrained(path)
    return path
