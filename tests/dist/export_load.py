"""Run under ``deepspeed --num_gpus TP`` (DS_ACCELERATOR=cpu): sharded loading of a base (+ adapter) on meta.

For each case of ``--cases`` (JSON list of {"name", "base", "adapter" (optional), "out"}): builds the model on
meta, ``shard_model`` + ``apply_miss`` (the adapter's MiSS config, or the default one with zero D), loads with
``load_sharded_weights`` (only this rank's slices), and saves the logits on the fixed input to ``out``. With an
adapter, also checks that its files are exactly what this TP run would write: the same layouts in
adapter_config.json, and each rank's file holding this rank's local D. Then a ``materialize_random`` model:
replicated parameters equal on all ranks, TP shards not, finite logits. Then, on a Llama whose TP=2 shards are
uneven, the layouts ``tools/reshard.py`` computes against those of this run. Prints per-rank bytes read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import groups
from safetensors.torch import load_file
from transformers import AutoConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from miss_ds import MissConfig, adapter_io, apply_miss, miss_layers  # noqa: E402
from miss_ds import engine as miss_engine  # noqa: E402
from miss_ds.distributed import exit_process, init_distributed  # noqa: E402
from miss_ds.loading import build_model_on_meta, load_sharded_weights, materialize_random  # noqa: E402
from miss_ds.convert.reshard import tp_view  # noqa: E402
from miss_ds.parallel.autotp import shard_model  # noqa: E402
from tests.conftest import tiny_llama_config  # noqa: E402
from tests.dist.export_make import MODES, input_ids  # noqa: E402

#: TP=2 splits it unevenly: 3 KV heads put q/o at [32, 16] and k/v at [16, 8]; the MLP's 100 in grains of 8 at [48, 52].
UNEVEN = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=100)
UNEVEN_GRAIN = 8


def meta_tp_model(base: str, miss: MissConfig):
    model = build_model_on_meta(AutoConfig.from_pretrained(base), torch.float32)
    shard_model(model, groups.get_tensor_model_parallel_group())
    apply_miss(model, miss)
    return model


def adapter_file_failures(model, miss: MissConfig, adapter: Path, rank: int, tp: int) -> list[str]:
    """Differences between the adapter on disk and what this TP run would write."""
    meta = adapter_io.read_adapter_config(adapter)
    failures = []
    if meta["tp_size"] != tp or meta["layouts"] != adapter_io.layouts(model, miss):
        failures.append(f"{adapter}: tp_size/layouts differ from a TP={tp} run's")
    local = load_file(str(adapter / adapter_io.shard_file(rank, tp)))
    for name, layer in miss_layers(model):
        if not torch.equal(local[f"{name}.miss_block"], layer.miss_block.detach()):
            failures.append(f"{adapter}: rank {rank}'s D of {name} differs from the loaded local D")
    return failures


def run_case(case: dict, rank: int, tp: int) -> dict:
    adapter = Path(case["adapter"]) if case.get("adapter") else None
    if adapter is not None:
        meta, full = adapter_io.read_full_adapter(adapter)
        miss = MissConfig(**meta["miss"])
    else:
        full, miss = None, MissConfig(r=8)
    model = meta_tp_model(case["base"], miss).eval()
    stats = load_sharded_weights(model, case["base"], "cpu", torch.float32, miss_config=miss, adapter=full)
    failures = adapter_file_failures(model, miss, adapter, rank, tp) if adapter is not None else []
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        failures.append(f"{case['name']}: lm_head is no longer tied to embed_tokens")
    with torch.no_grad():
        logits = model(input_ids=input_ids(model.config.vocab_size)).logits
    if rank == 0:
        torch.save(logits, case["out"])
    return {"bytes_read": stats.bytes_read, "sliced": stats.tensors_sliced, "failures": failures}


def random_case(base: str) -> dict:
    """materialize_random: replicated parameters equal on every rank, TP shards different, finite output."""
    model = meta_tp_model(base, MissConfig(r=8))
    materialize_random(model, "cpu", torch.float32, seed=3)
    embed = model.model.embed_tokens.weight.detach()
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (embed.sum().item(), q.sum().item()))
    with torch.no_grad():
        logits = model(input_ids=input_ids(model.config.vocab_size)).logits
    return {"replicated_equal": len({g[0] for g in gathered}) == 1, "shards_differ": len({g[1] for g in gathered}) > 1,
            "finite": bool(torch.isfinite(logits).all()), "q_std": q.std().item()}


def uneven_layouts(tp: int) -> dict:
    """Per mode: whether reshard's view of a TP run and ``shard_model`` + ``apply_miss`` split every adapter tensor
    alike, and the layouts of one column (q) and one MLP (gate) D."""
    config = tiny_llama_config(**UNEVEN)
    out = {}
    for mode, kw in MODES.items():
        miss = MissConfig(**kw)
        model = build_model_on_meta(config)
        shard_model(model, groups.get_tensor_model_parallel_group(), grain=UNEVEN_GRAIN)
        apply_miss(model, miss)
        run = adapter_io.layouts(model, miss)
        view = tp_view(config, miss, [name for name, _ in miss_layers(model)], tp, UNEVEN_GRAIN)
        out[mode] = {"equal": adapter_io.layouts(view, miss) == run,
                     "q": run["model.layers.0.self_attn.q_proj.miss_block"],
                     "gate": run["model.layers.1.mlp.gate_proj.miss_block"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", required=True, help="JSON list of cases")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    init_distributed()
    tp, rank = dist.get_world_size(), dist.get_rank()
    miss_engine.tensor_parallel_group(tp)
    cases = json.loads(args.cases)
    results = {case["name"]: run_case(case, rank, tp) for case in cases}
    results["random"] = random_case(cases[0]["base"])
    results["uneven"] = uneven_layouts(tp)
    gathered = [None] * tp
    dist.all_gather_object(gathered, results)
    if rank == 0:
        print("RESULT " + json.dumps({"tp": tp, "ranks": gathered}), flush=True)
    exit_process(0)


if __name__ == "__main__":
    main()
