"""Every shipped config is valid (with local stand-ins for the paths users fill in), and the memory plan behaves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from miss_ds import memory_plan
from miss_ds.engine import deepspeed_config
from miss_ds.model_shape import ModelShape
from miss_ds.run_config import load_config
from tests.launch_utils import ROOT

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("ckpt")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(path)
    return path


#: Shipped configs that need no files (random models, synthetic tokens or the shipped corpus).
SELF_CONTAINED = ("tiny-cpu.yaml", "llama-70b-tp2.yaml", "llama-70b-fp8-1gpu.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_is_valid(name, tiny_checkpoint):
    cfg = load_config(ROOT / "configs" / name) if name in SELF_CONTAINED else load_config(
        ROOT / "configs" / name, [f"model.path={tiny_checkpoint}", "tokenizer=data/arith/tokenizer",
                                  "data.train_path=data/arith/train.jsonl", "data.eval_path=data/arith/eval.jsonl"])
    assert cfg.train.max_steps > 0 and cfg.miss.r > 0


def test_plan_memory_cli_reports_fit():
    proc = subprocess.run([sys.executable, "tools/plan_memory.py", "--config", "configs/llama-70b-tp2.yaml"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "fits in 139.8 GiB" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "tools/plan_memory.py", "--config", "configs/llama-70b-tp2.yaml",
                           "--set", "model.recompute_layers=0"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout


LLAMA_70B = ModelShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000)


def test_plan_grows_as_fewer_layers_recompute_and_shrinks_with_zero():
    kw = dict(tp=2, dp=4, offload=False, micro_batch=2, seq=4096)
    totals = [memory_plan.plan(LLAMA_70B, zero=1, recompute=k, **kw).total for k in (80, 60, 40, 0)]
    assert totals == sorted(totals)
    adapter = [memory_plan.plan(LLAMA_70B, zero=z, recompute=80, **kw).adapter for z in (0, 1, 2, 3)]
    assert adapter == sorted(adapter, reverse=True) and adapter[0] > 2 * adapter[1]
    budget = memory_plan.plan(LLAMA_70B, zero=1, recompute=50, **kw).total
    assert memory_plan.layers_to_recompute(LLAMA_70B, budget, zero=1, **kw) == 50


def test_auto_recompute_plans_for_a_share_of_the_gpu():
    """``auto`` picks the fewest recomputed layers whose plan fits AUTO_MEMORY_FRACTION of the GPU, for mini
    with its own mini_r."""
    kw = dict(tp=2, dp=1, zero=1, offload=False, micro_batch=2, seq=4096, r=64, mode="mini", mini_r=16)
    gpu = memory_plan.plan(LLAMA_70B, recompute=30, **kw).total / memory_plan.AUTO_MEMORY_FRACTION
    assert memory_plan.auto_recompute_layers(LLAMA_70B, gpu, **kw) == 30
    assert memory_plan.plan(LLAMA_70B, recompute=29, **kw).total > memory_plan.AUTO_MEMORY_FRACTION * gpu


@pytest.mark.parametrize("device, overrides, fused", [
    ("cuda", [], True), ("cpu", [], False),
    ("cuda", ["parallel.offload_optimizer=true"], False),  # the state lives on the host
    ("cuda", ["deepspeed.optimizer.params.fused=false"], False)])  # the run's deepspeed: section wins
def test_adamw_is_fused_where_its_state_lives_on_a_gpu(device, overrides, fused):
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    params = deepspeed_config(cfg, device)["optimizer"]["params"]
    assert params["fused"] is fused and params["torch_adam"] is True
