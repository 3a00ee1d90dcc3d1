"""Run under ``deepspeed --num_gpus TP`` (DS_ACCELERATOR=cpu): write the inputs of the export tests.

For each case (a MiSS mode on a tiny Llama, or ``qwen2``: ``miss`` on a tiny Qwen2; ``random``: see ``make_random``),
under ``--out/<case>/``: the tiny random base (``save_pretrained``, sharded), a training-checkpoint style adapter ``checkpoints/step_00000001/adapter/``
written by a TP=world run (random D, with the base fingerprint the TP model reads), and the logits of the base and of
the TP MiSS model on fixed input (``logits_base.pt``, ``logits_tp.pt``).
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
from miss_ds import MissConfig, adapter_io, apply_miss, fingerprint  # noqa: E402
from miss_ds import engine as miss_engine  # noqa: E402
from miss_ds.distributed import ParallelLayout, exit_process, init_distributed  # noqa: E402
from miss_ds.inject import adapter_state_dict  # noqa: E402
from miss_ds.parallel.autotp import shard_model  # noqa: E402
from tests.conftest import tiny_llama_config, tiny_qwen2_config  # noqa: E402

MODES = {"miss": dict(mode="miss", r=8), "mini": dict(mode="mini", r=8, mini_r=4), "bat": dict(mode="bat", r=4)}
# miss: ragged MLP shards (100); mini: tied embeddings; bat: whole r x r blocks per shard (96 = 4 x 24).
MODELS = {"miss": {}, "mini": {"tie_word_embeddings": True}, "bat": {"intermediate_size": 96}}
#: Cases beyond the modes: another model family (biased q/k/v projections), MiSS config and model config.
FAMILIES = {"qwen2": (dict(mode="miss", r=8), tiny_qwen2_config)}
STEP = "checkpoints/step_00000001"


def case_model(case: str):
    """The tiny random base model of ``case``."""
    from transformers import AutoModelForCausalLM

    cfg = FAMILIES[case][1]() if case in FAMILIES else tiny_llama_config(**MODELS[case])
    return AutoModelForCausalLM.from_config(cfg)


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(7))


def make(mode: str, out: Path, tp: int) -> None:
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = case_model(mode).eval()
    ids = input_ids(base.config.vocab_size)
    adapter = out / mode / STEP / "adapter"
    if rank == 0:
        adapter.mkdir(parents=True)
        base.save_pretrained(out / mode / "base", max_shard_size="40KB")
        with torch.no_grad():
            torch.save(base(input_ids=ids).logits, out / mode / "logits_base.pt")
    model = copy.deepcopy(base)
    miss = MissConfig(init_weights=False, **(FAMILIES[mode][0] if mode in FAMILIES else MODES[mode]))
    torch.manual_seed(1)
    shard_model(model, groups.get_tensor_model_parallel_group())
    apply_miss(model, miss)
    base_fingerprint = fingerprint.of_model(model)
    dist.barrier()
    if rank == 0:
        adapter_io.write_adapter_config(adapter, miss, model, tp, base_fingerprint)
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(model), rank, tp)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if rank == 0:
        torch.save(logits, out / mode / "logits_tp.pt")
    dist.barrier()


def make_random(out: Path, tp: int) -> None:
    """Case ``random``: the tiny Llama's random base drawn as a training run draws it (``materialize_random`` on the
    TP-split model, seed 0) and saved by ``save_random_base`` in ``random/base``, a random-D adapter recording it,
    and the TP model's logits (``logits_tp.pt``)."""
    from miss_ds.loading import build_model_on_meta, materialize_random
    from miss_ds.random_base import save_random_base

    rank, case = dist.get_rank(), out / "random"
    model = build_model_on_meta(tiny_llama_config(), torch.float32)
    miss = MissConfig(init_weights=False, **MODES["miss"])
    shard_model(model, groups.get_tensor_model_parallel_group())
    apply_miss(model, miss)
    materialize_random(model, "cpu", torch.float32, seed=0, miss_config=miss)
    save_random_base(model, case, None, ParallelLayout(rank, tp, tp))
    base_fingerprint = fingerprint.of_model(model)
    adapter = case / STEP / "adapter"
    if rank == 0:
        adapter.mkdir(parents=True)
        adapter_io.write_adapter_config(adapter, miss, model, tp, base_fingerprint)
    dist.barrier()
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(model), rank, tp)
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids(model.config.vocab_size)).logits
    if rank == 0:
        torch.save(logits, case / "logits_tp.pt")
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
        if mode == "random":
            make_random(Path(args.out), tp)
        else:
            make(mode, Path(args.out), tp)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": tp, "modes": args.modes.split(",")}), flush=True)
    exit_process(0)


if __name__ == "__main__":
    main()
