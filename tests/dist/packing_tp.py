"""Run under ``deepspeed --num_gpus 2`` (DS_ACCELERATOR=cpu): packed training at TP=2 equals unpacked training.

``--data`` holds, per data format, a packed micro-batch and the same examples as padded one-row batches
(``tests/test_packing.py`` writes it). For each format, a TP=2 DeepSpeed engine takes one forward and backward
on the packed batch; a single-device model with the same weights and D runs the examples one by one, its loss
averaged per token over all of them. Loss and every D gradient (each rank's shard against the matching slice)
must agree. Prints ``RESULT {...}`` on rank 0 and exits non-zero on any mismatch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import groups, safe_get_full_grad

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from miss_ds import MissConfig, apply_miss, miss_layers  # noqa: E402
from miss_ds import engine as miss_engine  # noqa: E402
from miss_ds.distributed import exit_process, init_distributed  # noqa: E402
from miss_ds.parallel.autotp import shard_model  # noqa: E402
from tests.conftest import tiny_llama_config  # noqa: E402
from tests.dist.tp_equivalence import check, ds_config  # noqa: E402
from tests.packing_reference import loss_and_d_grads  # noqa: E402


def run_format(name: str, packed: dict, one_by_one: list[dict], failures: list[str]) -> None:
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(vocab_size=512, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    reference = copy.deepcopy(base)
    miss_cfg = MissConfig(r=8, init_weights=False)
    torch.manual_seed(1)
    apply_miss(reference, miss_cfg)
    torch.manual_seed(1)
    shard_model(base, groups.get_tensor_model_parallel_group())
    apply_miss(base, miss_cfg)
    engine, *_ = miss_engine.initialize(base, ds_config(zero=1, offload=False, accum=1), tp_size=2)

    loss = engine(**packed).loss
    engine.backward(loss)
    want_loss, want_grads = loss_and_d_grads(reference, one_by_one)
    check(f"{name} loss", loss.detach(), want_loss, failures, tol=1e-5)
    for layer_name, layer in miss_layers(engine.module):
        grad = safe_get_full_grad(layer.miss_block)
        check(f"{name} grad {layer_name}", grad, layer.shard_d(want_grads[layer_name]), failures)
    engine.destroy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    init_distributed()
    miss_engine.tensor_parallel_group(2)
    cases = torch.load(args.data)
    failures: list[str] = []
    for name, (packed, one_by_one) in cases.items():
        run_format(name, packed, one_by_one, failures)
    all_failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_failures, failures)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"formats": list(cases), "failures": sum(all_failures, [])}), flush=True)
    exit_process(1 if any(all_failures) else 0)


if __name__ == "__main__":
    main()
