"""Shared test helpers: tiny random models, a CPU DeepSpeed environment, and the TP-written export inputs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs root and a local Slurm / OpenMPI (tools/local_cluster.sh)")


#: The tiny decoder shape of the unit tests: MLP shards are ragged for r=8 (intermediate 100: TP=2 shards of 50,
#: TP=4 of 25).
TINY_SHAPE = dict(hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)


def _tiny_config(config_class, overrides: dict):
    cfg = config_class(**{**TINY_SHAPE, **overrides})
    cfg._attn_implementation = "eager"
    return cfg


def tiny_llama_config(**overrides):
    """A tiny Llama of ``TINY_SHAPE``."""
    from transformers import LlamaConfig

    return _tiny_config(LlamaConfig, overrides)


def tiny_qwen2_config(**overrides):
    """A tiny Qwen2 (biased q/k/v projections), shaped like ``tiny_llama_config``."""
    from transformers import Qwen2Config

    return _tiny_config(Qwen2Config, overrides)


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


@pytest.fixture(scope="session")
def export_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def _export_run(root: Path, tp: int, cases: str) -> Path:
    from tests.launch_utils import deepspeed_run, result_of

    proc = deepspeed_run("tests/dist/export_make.py", ["--out", str(root / f"tp{tp}"), "--modes", cases], tp)
    assert result_of(proc)["tp"] == tp and proc.returncode == 0, proc.stderr[-3000:]
    return root / f"tp{tp}"


@pytest.fixture(scope="session")
def export_tp2(export_root) -> Path:
    """One 2-rank run of ``tests/dist/export_make.py`` (every MiSS mode on Llama, Qwen2, a saved random base), shared
    by the export and the serving tests: ``<root>/tp2/<case>/{base, checkpoints/step_00000001/adapter, logits_*.pt}``."""
    return _export_run(export_root, 2, "miss,mini,bat,qwen2,random")


@pytest.fixture(scope="session")
def export_tp4(export_root) -> Path:
    """The same for the MiSS modes at TP=4: ``<root>/tp4/<mode>/...``."""
    return _export_run(export_root, 4, "miss,mini,bat")
