"""``model.kernels: liger`` on a CUDA GPU (skipped elsewhere): every family marked for it (``Family.liger``) computes
the loss and D's gradients that transformers' own code computes, and the default job trains to the same eval loss
with Liger's kernels, in bf16 and on an FP8 base. ``pytest -s`` prints the measured differences."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from miss_ds import MissConfig, apply_miss
from miss_ds.families import FAMILIES
from miss_ds.fused_kernels import apply_kernels
from tests.launch_utils import train_default_job_on_gpu
from tests.tiny_models import TINY, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need a CUDA GPU")
LIGER_FAMILIES = [t for t, f in FAMILIES.items() if f.liger]


def _loss_and_grads(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.train()
    loss = model(input_ids=ids, labels=labels, num_items_in_batch=(labels[:, 1:] != -100).sum()).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", LIGER_FAMILIES)
def test_liger_computes_what_transformers_computes(model_type):
    """A tiny model of the family with MiSS (r=8, random D) in float32: the loss (summed over the batch's loss
    tokens, as training does) and every D gradient with Liger's kernels equal those of transformers' code, up to
    float32 rounding; the norms, the rotary embedding, the MLP (or the MoE experts) and the loss were replaced."""
    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().cuda()
    apply_miss(model, MissConfig(r=8, init_weights=False).for_model(config))
    reference = copy.deepcopy(model)
    ids = torch.randint(3, TINY[model_type]["vocab_size"], (2, 24), device="cuda")
    labels = ids.clone()
    labels[0, :7] = -100
    want_loss, want = _loss_and_grads(reference, ids, labels)  # before Liger patches the family's module
    message = apply_kernels(model, "liger")
    got_loss, got = _loss_and_grads(model, ids, labels)
    errors = {n: ((got[n] - g).norm() / g.norm()).item() for n, g in want.items()}
    worst = max(errors, key=errors.get)
    print(f"\nLiger {model_type}: loss {got_loss.item():.6f} vs {want_loss.item():.6f}; worst D gradient {worst} "
          f"{errors[worst]:.2e}; {message}")
    assert want and set(got) == set(want)
    assert abs(got_loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert errors[worst] < 1e-4, errors
    assert all(part in message for part in ("RMSNorm", "ForCausalLM", "apply_rotary_pos_emb")), message
    assert "MLP" in message or "Experts" in message, message


def test_default_job_with_liger_reaches_the_eval_loss_of_transformers_code(tmp_path):
    """The README's default job on the GPU in bf16 (lr 3e-3, as tests/test_fp8_gpu.py) with transformers' code, with
    Liger's kernels, and with Liger's kernels on an FP8 base (on GPUs with FP8 tensor cores): final eval losses within 3% of the first run's, every
    run learned (last eval loss under half the first logged train loss), and the Liger runs said what they
    replaced."""
    variants = {"hf": (), "liger": ("model.kernels=liger",)}
    if torch.cuda.get_device_capability() >= (8, 9):  # FP8 tensor cores
        variants["liger_fp8"] = ("model.kernels=liger", "model.base_precision=fp8")
    runs = {name: train_default_job_on_gpu(tmp_path / name, "model.dtype=bfloat16", "train.lr=3e-3", *sets)
            for name, sets in variants.items()}
    print("\nLiger convergence: " + json.dumps({n: {"eval": [round(v, 4) for v in r["eval"]],
                                                     "step_s": r["summary"]["step_s_median"]} for n, r in runs.items()}))
    assert [r["summary"]["kernels"] for r in runs.values()] == ["hf"] + ["liger"] * (len(runs) - 1)
    reference = runs["hf"]["eval"]
    assert len(reference) == 3
    for name, run in runs.items():
        assert run["eval"][-1] < 0.5 * run["first_train"], name
        assert abs(run["eval"][-1] - reference[-1]) <= 0.03 * reference[-1], (name, run["eval"], reference)
        assert ("Liger kernels on llama" in run["output"]) == (name != "hf"), name
