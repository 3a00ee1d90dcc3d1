"""The support matrix (miss_ds.families.SUPPORT, README.md's table): every supported family trains at TP=2 equal to
TP=1, loads per rank from a ``save_pretrained`` checkpoint and exports (``tests/dist/families.py``, one 2-rank launch
for all of them); the trainer runs families other than Llama from a checkpoint on chat data in their own template;
refusals come from the config alone, naming the family and what works instead.
CI time: the 2-rank launch about 30 s, each trainer run about 20 s (2 cores, unloaded).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from miss_ds import MissConfig, apply_miss, miss_layers
from miss_ds.data.config import DataConfig
from miss_ds.data.encode import IGNORE_INDEX, check_tokenizer, encode_batch
from miss_ds.families import FAMILIES, SUPPORT, UnsupportedModel, check_tp, support_table
from miss_ds.flops import frozen_finetune_flops_per_token
from miss_ds.model_shape import ModelShape
from miss_ds.modeling import hf_config
from miss_ds.run_config import ConfigError, ModelConfig
from miss_ds.train.preflight import check_model_fits_run
from tests.chat_templates import CHAT, tokenizer
from tests.launch_utils import ROOT, deepspeed_run, free_port, result_of
from tests.tiny_models import TINY, tiny_config

SUPPORTED = [t for t, (cells, _) in SUPPORT.items() if cells == ("yes",) * 4]
#: One 2-rank launch: every supported family in miss mode, fused Phi-3 in every mode, the 5-head Llama.
CASES = [f"{t}:miss" for t in SUPPORTED] + ["phi3:mini", "phi3:bat", "llama-5-heads:miss"]


def test_readme_holds_the_support_matrix():
    assert support_table() in (ROOT / "README.md").read_text()
    assert set(SUPPORT) == set(FAMILIES) | {"gpt2"}


@pytest.fixture(scope="module")
def families_run(tmp_path_factory) -> dict:
    proc = deepspeed_run("tests/dist/families.py", ["--out", str(tmp_path_factory.mktemp("families")),
                                                   "--cases", ",".join(CASES)], 2)
    result = result_of(proc)
    assert proc.returncode == 0 and result["failures"] == [], result["failures"]
    return {r["case"] + ":" + r["mode"]: r for r in result["results"]}


def test_every_supported_family_at_tp2_equals_tp1_loads_per_rank_and_exports(families_run):
    """tests/dist/families.py asserts, per case, equal losses and D gradients at every step, equal merged weights,
    and merged / PEFT exports with the TP=1 model's logits; here: every case ran, read only its share."""
    assert sorted(families_run) == sorted(CASES)
    for case, result in families_run.items():
        assert result["losses"][1] != result["losses"][0], case
        assert 0 < result["bytes_read"] < result["checkpoint_bytes"] and result["sliced"] > 0, case


def test_moe_routed_experts_are_split_and_reported_not_adapted(families_run):
    for family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        result = families_run[f"{family}:miss"]
        assert result["experts_not_adapted"] > 0 and "routed experts not adapted" in result["report"], result
    # Mixtral: attention only (4 x 2 layers), its router trained in full; Qwen2-MoE: attention and shared expert.
    assert families_run["mixtral:miss"]["adapted"] == 8
    assert families_run["mixtral:miss"]["saved"] == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert families_run["qwen2_moe:miss"]["adapted"] == 14
    assert families_run["gpt_neox:miss"]["saved"] == ["lm_head.weight"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_default_targets_are_the_family_projections(name):
    config = tiny_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_miss(model, MissConfig(r=8))
    family = FAMILIES[config.model_type]
    adapted = {n.rpartition(".")[2] for n, _ in miss_layers(model)}
    # Qwen3-MoE's dense MLP projections exist only in its mlp_only_layers (none here).
    assert adapted == set(family.targets) & linears and {"o_proj", "down_proj", "dense"} & adapted
    assert adapted <= set(family.tp_plan)


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_shape_counts_and_flops_equal_the_built_model(name):
    """Linear and expert weights as built; flops per token as torch counts the forward (eager attention), twice."""
    config = tiny_config(name)
    config._experts_implementation = "eager"  # torch's flop counter does not count grouped_mm
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    shape = ModelShape.from_config(config)
    stored = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n
                 and not n.startswith("lm_head"))
    assert shape.layers * shape.layer_linear_params() == stored
    seq = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(3, config.vocab_size, (1, seq)))
    assert frozen_finetune_flops_per_token(config, seq) == pytest.approx(2 * counter.get_total_flops() / seq)


# ----------------------------------------------------------------------------------------------- configs
def test_config_is_built_by_its_class_so_derived_fields_follow():
    """The README's tiny Llama: hidden 128 over 4 heads is head_dim 32 (q_proj 128 -> 128), not the class default."""
    config = hf_config(ModelConfig(config={"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4}))
    assert config.head_dim == 32 and config.num_key_value_heads == 4
    legacy = hf_config(ModelConfig(config={"model_type": "gpt_neox", "rotary_pct": 0.5, "rotary_emb_base": 500}))
    assert legacy.rope_parameters["partial_rotary_factor"] == 0.5 and legacy.rope_parameters["rope_theta"] == 500


def test_a_run_from_a_checkpoint_records_it_as_the_adapters_base(tmp_path, monkeypatch):
    """convert/generate find the base of a run from ``model.path`` without --base: the adapter records its path,
    absolute, whatever the run's working directory was."""
    from transformers import LlamaForCausalLM

    from miss_ds.adapter_io import base_summary
    from tests.conftest import tiny_llama_config

    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = LlamaForCausalLM(hf_config(ModelConfig(path="base")))
    assert base_summary(model)["name_or_path"] == str((tmp_path / "base").resolve())


def test_unknown_config_field_names_the_nearest():
    with pytest.raises(ConfigError, match=r"'model.config.num_hidden_layer'.*mean 'model.config.num_hidden_layers'"):
        hf_config(ModelConfig(config={"model_type": "llama", "num_hidden_layer": 2}))


def test_unsupported_families_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported: GPT-2's projections are Conv1D.*Llama \(llama\)"):
        hf_config(ModelConfig(config={"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"'bert' is not supported: miss_ds has no tested support"):
        hf_config(ModelConfig(config={"model_type": "bert"}))


def test_attention_implementation_defaults_to_what_the_family_supports():
    assert hf_config(ModelConfig(config=TINY["gemma2"]))._attn_implementation == "eager"
    assert hf_config(ModelConfig(config=TINY["gemma3_text"]))._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match=r"attn_implementation='sdpa': Gemma2 does not support it.*soft-capping"):
        hf_config(ModelConfig(config=TINY["gemma2"], attn_implementation="sdpa"))


def test_tp_beyond_the_kv_heads_is_refused_with_sizes_that_work():
    one_kv = tiny_config("mistral", num_key_value_heads=1)
    with pytest.raises(UnsupportedModel, match=r"tp_size=2 is more than the 1 key/value heads.*tp_size in \[1\]"):
        check_tp(one_kv, 2)
    with pytest.raises(ConfigError, match=r"tp_size in \[1, 2\] \(on 4 ranks\)"):
        check_model_fits_run(tiny_config("mistral"), 4, 4, seq_len=32)
    check_model_fits_run(tiny_config("llama"), 2, 2, seq_len=32)  # 3 KV heads over 2 ranks: [2, 1]


def test_seq_len_beyond_the_positions_is_refused_unless_rope_scaling_stretches_them(caplog):
    with pytest.raises(ConfigError, match=r"data.seq_len=65 is longer than the model's max_position_embeddings=64"):
        check_model_fits_run(tiny_config("mistral"), 1, 1, seq_len=65)
    check_model_fits_run(tiny_config("llama"), 1, 1, seq_len=65)  # llama3 rope scaling
    assert "relying on the model's 'llama3' rope scaling" in caplog.text


# ----------------------------------------------------------------------------------------------- chat templates
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]


@pytest.mark.parametrize("model_type", sorted(t for t in CHAT if CHAT[t][0] is not None))
def test_chat_data_in_each_family_template_trains_on_assistant_turns(model_type):
    tok = tokenizer(model_type)
    data = DataConfig(train_path="unused.jsonl", format="chat")
    check_tokenizer(tok, data)
    encoded = encode_batch({"messages": [MESSAGES]}, tok, data)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    whole = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert tok.decode(ids) in (whole, whole + tok.eos_token)
    trained = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    first, _, second = trained.partition("It is 6.")
    # Each assistant turn with the text that ends it (the template's end-of-turn marker), and nothing else.
    assert first.startswith("It is 4.") and first != "It is 4." and second
    assert not any(marker in trained for marker in ("2+2", "3+3", "user", "[INST]", "assistant"))


def test_chat_data_without_a_template_is_refused():
    with pytest.raises(ValueError, match="has no chat_template"):
        check_tokenizer(tokenizer("gpt_neox"), DataConfig(train_path="unused.jsonl", format="chat"))


# ----------------------------------------------------------------------------------------------- the trainer
def _checkpoint_and_data(directory: Path, name: str) -> str:
    """A ``save_pretrained`` base of ``name`` with its family's tokenizer, and data: chat rows in the family's
    template, or instruction rows for a family without one (GPT-NeoX). Returns the data format."""
    tok = tokenizer(tiny_config(name).model_type)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(name, vocab_size=len(tok))).save_pretrained(directory / "base")
    tok.save_pretrained(directory / "base")
    sums = [(f"{a}+{b}", str(a + b)) for a in range(12) for b in range(12)]
    chat = tok.chat_template is not None
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} if chat else
            {"prompt": q, "response": a} for q, a in sums]
    (directory / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return "chat" if chat else "instruction"


@pytest.mark.parametrize("name", ["phi3", "gpt_neox", "mixtral"])
def test_trainer_runs_a_family_at_tp2_from_its_checkpoint(tmp_path, name):
    """launch/train.py at TP=2, weights read per rank from a save_pretrained checkpoint, the family's default targets,
    chat data in the family's own template; the run ends with its summary and plot."""
    data_format = _checkpoint_and_data(tmp_path, name)
    out = tmp_path / "run"
    sets = [f"output_dir={out}", f"model.path={tmp_path / 'base'}", "model.config={}", "tokenizer=null",
            "model.attn_implementation=null", "miss.target_modules=null", "parallel.tp_size=2",
            f"data.train_path={tmp_path / 'data.jsonl'}", "data.eval_path=null", "data.eval_fraction=0.1",
            f"data.format={data_format}", "data.seq_len=32", "train.micro_batch_size=4", "train.max_steps=4",
            "train.warmup_steps=1", "eval.every_steps=0",
            "checkpoint.every_steps=0", "logging.progress=false"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/train.py", "--config", "configs/tiny-cpu.yaml", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tp_size"] == 2 and summary["eval_loss"] > 0
    assert (out / "loss.png").is_file()
    adapter = json.loads((out / "checkpoints" / "step_00000004" / "adapter" / "adapter_config.json").read_text())
    assert adapter["miss"]["target_modules"] == list(FAMILIES[tiny_config(name).model_type].targets)
    if name == "mixtral":
        assert "routed experts not adapted" in proc.stdout + proc.stderr
