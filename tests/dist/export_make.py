"""Run under ``deepspeed --num_gpus TP`` (DS_ACCELERATOR=cpu): write the inputs of the export tests.

For each mode, under ``--out/<mode>/``: the tiny random base (``save_pretrained``, sharded), a training-checkpoint
style adapter ``checkpoints/step_00000001/adapter/`` written by a TP=world run (random D), and the logits of the
base and of the TP MiSS model on fixed input (``logits_base.pt``, ``logits_tp.pt``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import groups

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from miss_ds import MissConfig, adapter_io, apply_miss  # noqa: E402
from miss_ds import engine as miss_engine  # noqa: E402
from miss_ds.distributed import exit_process, init_distributed  # noqa: E402
from miss_ds.inject import adapter_state_dict  # noqa: E402
from miss_ds.parallel.autotp import shard_model  # noqa: E402
from tests.conftest import tiny_llama_config  # noqa: E402

MODES = {"miss": dict(mode="miss", r=8), "mini": dict(mode="mini", r=8, mini_r=4), "bat": dict(mode="bat", r=4)}
# miss: ragged MLP shards (100); mini: tied embeddings; bat: whole r x r blocks per shard (96 = 4 x 24).
MODELS = {"miss": {}, "mini": {"tie_word_embeddings": True}, "bat": {"intermediate_size": 96}}
STEP = "checkpoints/step_00000001"


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(7))


def make(mode: str, out: Path, tp: int) -> None:
    rank = dist.get_rank()
    cfg = tiny_llama_config(**MODELS[mode])
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM(cfg).eval()
    ids = input_ids(cfg.vocab_size)
    adapter = out / mode / STEP / "adapter"
    if rank == 0:
        adapter.mkdir(parents=True)
        base.save_pretrained(out / mode / "base", max_shard_size="40KB")
        with torch.no_grad():
            torch.save(base(input_ids=ids).logits, out / mode / "logits_base.pt")
    model = copy.deepcopy(base)
    miss = MissConfig(init_weights=False, **MODES[mode])
    torch.manual_seed(1)
    shard_model(model, groups.get_tensor_model_parallel_group())
    apply_miss(model, miss)
    dist.barrier()
    if rank == 0:
        adapter_io.write_adapter_config(adapter, miss, model, tp)
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(model), rank, tp)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if rank == 0:
        torch.save(logits, out / mode / "logits_tp.pt")
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default="miss,mini,bat")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    init_distributed()
    tp = dist.get_world_size()
    miss_engine.tensor_parallel_group(tp)
    for mode in args.modes.split(","):
        make(mode, Path(args.out), tp)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": tp, "modes": args.modes.split(",")}), flush=True)
    exit_process(0)


if __name__ == "__main__":
    main()
