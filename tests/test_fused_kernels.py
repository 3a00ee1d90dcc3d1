"""``model.kernels`` on CPU: what is refused, with what message, and that a refused run builds nothing. The kernels
themselves run on a GPU: tests/test_fused_kernels_gpu.py."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from miss_ds import memory_plan
from miss_ds.families import FAMILIES, support_table
from miss_ds.fused_kernels import kernels_problem
from miss_ds.model_shape import ModelShape
from miss_ds.run_config import ConfigError, load_config
from tests.launch_utils import ROOT

CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def test_hf_needs_nothing_and_liger_needs_a_tested_family_a_gpu_and_the_package(monkeypatch):
    assert kernels_problem("hf", "gpt_neox", "cpu") is None
    untested = kernels_problem("liger", "gpt_neox", "cuda")
    assert "model.kernels=liger has no tested kernels for model_type 'gpt_neox'" in untested
    assert "llama" in untested and "qwen2_moe" not in untested.partition("tested: ")[2]
    assert "set model.kernels=hf" in untested
    cpu = kernels_problem("liger", "llama", "cpu")
    assert "need a CUDA GPU; this run's device is cpu" in cpu and "set model.kernels=hf" in cpu
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    missing = kernels_problem("liger", "llama", "cuda")
    assert "needs the liger-kernel package" in missing and ".[liger]" in missing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert kernels_problem("liger", "llama", "cuda") is None


def test_unknown_kernels_value_is_refused_by_the_config():
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG, ["model.kernels=triton", "output_dir=unused"], check_files=False)
    assert "'model.kernels' is 'triton'; choose one of ['hf', 'liger']" in str(err.value), str(err.value)


def test_support_table_marks_the_families_liger_is_tested_on():
    rows = {line.split("`")[1]: line for line in support_table().splitlines()[2:]}
    for model_type, family in FAMILIES.items():
        assert rows[model_type].split(" | ")[5] == ("yes" if family.liger else "-"), rows[model_type]


def test_train_refuses_liger_on_cpu_before_building_the_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config", str(CONFIG), "--set", "model.kernels=liger", "--set",
         f"output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: model.kernels=liger runs Triton kernels, which need a CUDA GPU" in proc.stderr
    assert "MiSS on" not in proc.stderr and not (tmp_path / "base").exists()  # nothing was built


#: Peaks measured on one H200 (docs/scale.md, docs/logs/liger/run2 and run3): the 80-layer Llama-2-70B shape, TP=1,
#: FP8 base, Liger's kernels, micro-batch 2 x 4096, MiSS r=64, ZeRO-1; recomputed layers -> peak GiB.
LIGER_FP8_PEAKS_GIB = {63: 104.089, 54: 115.674}


def test_memory_plan_with_liger_against_the_measured_peaks():
    """With Liger's kernels a stored layer keeps one q, k and SiLU output less per token and the loss no logits;
    the plan is within 3% above the peaks measured on the GPU (transformers' terms would overshoot by 12-14%),
    so ``auto`` stores more layers."""
    shape = ModelShape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000)
    kw = dict(tp=1, dp=1, zero=1, offload=False, micro_batch=2, seq=4096, r=64, mode="miss", mini_r=1,
              base_precision="fp8")
    for recompute, peak in LIGER_FP8_PEAKS_GIB.items():
        liger = memory_plan.plan(shape, recompute=recompute, kernels="liger", **kw).total / 2**30
        hf = memory_plan.plan(shape, recompute=recompute, **kw).total / 2**30
        assert peak <= liger <= 1.03 * peak and hf > 1.1 * peak, (recompute, peak, liger, hf)
    gpu = 140.4 * 2**30  # an H200
    assert memory_plan.auto_recompute_layers(shape, gpu, kernels="liger", **kw) \
        < memory_plan.auto_recompute_layers(shape, gpu, **kw)
