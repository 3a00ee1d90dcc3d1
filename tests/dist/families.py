"""Run under ``deepspeed --num_gpus 2`` (DS_ACCELERATOR=cpu): every supported family at TP=2 against TP=1.

For each case of ``--cases`` (a tiny config of ``tests.tiny_models`` and a MiSS mode): rank 0 saves a random base
with ``save_pretrained`` (the checkpoint layout transformers writes: GPT-NeoX's ``embed_out``, per-expert MoE
weights), then every rank builds the model as a run does (config from the checkpoint through ``modeling.hf_config``,
built on meta, weights read per rank) twice: whole (the TP=1 reference) and split over the 2 ranks. Both get the same
random D and take the same AdamW steps on the same batches; asserts equal losses and D gradients at every step
(each TP shard against the matching part of the reference's) and equal merged weights gathered from the shards.
Then the TP run's adapter is written as a training checkpoint writes it, and rank 0 checks that it reassembles to
the reference's D, that the merged export loads with ``from_pretrained`` and the PEFT export with
``PeftModel.from_pretrained``, both with the reference's logits, and that random weights (``model.random_init``)
materialise at TP=2 with finite logits. Exits non-zero on any mismatch.
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from miss_ds import MissConfig, adapter_io, apply_miss, miss_layers  # noqa: E402
from miss_ds import engine as miss_engine  # noqa: E402
from miss_ds.distributed import exit_process, init_distributed  # noqa: E402
from miss_ds.inject import adapter_state_dict  # noqa: E402
from miss_ds.loading import build_model_on_meta, load_sharded_weights, materialize_random  # noqa: E402
from miss_ds.modeling import hf_config  # noqa: E402
from miss_ds.parallel.autotp import shard_model  # noqa: E402
from miss_ds.run_config import ModelConfig  # noqa: E402
from tests.tiny_models import tiny_config  # noqa: E402
from tests.tp_gather import full_d, full_merged_weight  # noqa: E402

MODES = {"miss": dict(mode="miss", r=8), "mini": dict(mode="mini", r=8, mini_r=4), "bat": dict(mode="bat", r=4)}
#: Trained in full beside D, and exported under the checkpoint's own names (GPT-NeoX's embed_out, Mixtral's
#: block_sparse_moe.gate).
MODULES_TO_SAVE = {"gpt_neox": ["lm_head"], "mixtral": ["gate"]}
LR, STEPS = 1e-2, 2


def check(name: str, got: torch.Tensor, want: torch.Tensor, failures: list, tol: float = 1e-4) -> None:
    """Relative error ||got - want|| / ||want|| within ``tol`` (fp32 arithmetic in a different order)."""
    rel = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()
    if not rel <= tol:
        failures.append(f"{name}: relative error {rel:.3e}")


def batch(vocab: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, vocab, (2, 11), generator=g)
    return {"input_ids": ids, "labels": ids.masked_fill(torch.arange(11) < 3, -100)}


def build(base: Path, miss: MissConfig, tp: bool):
    """The model as a run builds it: config from the checkpoint, built on meta, split, adapted, read per rank."""
    config = hf_config(ModelConfig(path=str(base), attn_implementation="eager"))
    model = build_model_on_meta(config, torch.float32)
    if tp:
        shard_model(model, groups.get_tensor_model_parallel_group())
    report = apply_miss(model, miss)
    torch.manual_seed(1)  # D is drawn whole from the same RNG state by both models, each keeping its part
    stats = load_sharded_weights(model, base, "cpu", torch.float32, miss_config=miss)
    return model, report, stats


def run(tiny: str, mode: str, out: Path, failures: list) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    name = f"{tiny}/{mode}"
    root = out / tiny / mode
    base = root / "base"
    config = tiny_config(tiny)
    if rank == 0:
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(config).save_pretrained(base)
    dist.barrier()
    miss = MissConfig(init_weights=False, modules_to_save=MODULES_TO_SAVE.get(config.model_type, []), **MODES[mode])
    reference, _, _ = build(base, miss, tp=False)
    model, report, stats = build(base, miss, tp=True)
    ref_d = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR, eps=1e-4) for m in (reference, model)]
    layers = dict(miss_layers(model))
    losses = []
    for step in range(STEPS):
        data = batch(model.config.vocab_size, step)
        ref_loss, loss = (m(**data).loss for m in (reference, model))
        for m, value, opt in zip((reference, model), (ref_loss, loss), optimizers):
            opt.zero_grad()
            value.backward()
        check(f"{name} step {step} loss", loss.detach(), ref_loss.detach(), failures)
        for layer_name, layer in layers.items():
            check(f"{name} step {step} grad {layer_name}", layer.miss_block.grad,
                  layer.shard_d(ref_d[f"{layer_name}.miss_block"].grad), failures)
        for opt in optimizers:
            opt.step()
        losses.append(ref_loss.item())
    for layer_name, layer in layers.items():
        ref_layer = reference.get_submodule(layer_name)
        check(f"{name} merged {layer_name}", full_merged_weight(layer), ref_layer.merged_weight(), failures)
        check(f"{name} D {layer_name}", full_d(layer), ref_layer.miss_block.detach(), failures)
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".miss_block")}
    for param_name, param in saved.items():
        check(f"{name} saved {param_name}", param.detach(), ref_d[param_name].detach(), failures)

    adapter = root / "checkpoints" / "step_00000002" / "adapter"
    if rank == 0:
        adapter.mkdir(parents=True)
        adapter_io.write_adapter_config(adapter, miss, model, world)
    dist.barrier()
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(model, miss), rank, world)
    dist.barrier()
    if rank == 0:
        check_exports(name, reference, base, adapter, root, failures)
    dist.barrier()
    if not random_model_is_finite(base):
        failures.append(f"{name}: random weights (model.random_init) at TP=2 give non-finite logits")
    return {"case": tiny, "family": config.model_type, "mode": mode, "losses": losses, "report": str(report),
            "adapted": len(layers), "saved": sorted(saved), "experts_not_adapted": report.experts_not_adapted,
            "bytes_read": stats.bytes_read, "sliced": stats.tensors_sliced,
            "checkpoint_bytes": sum((base / f).stat().st_size for f in os.listdir(base) if f.endswith(".safetensors"))}


@torch.no_grad()
def random_model_is_finite(base: Path) -> bool:
    """``model.random_init`` at TP=2: every parameter and buffer drawn or recomputed on this rank, finite logits."""
    config = hf_config(ModelConfig(path=str(base), attn_implementation="eager"))
    model = build_model_on_meta(config, torch.float32)
    shard_model(model, groups.get_tensor_model_parallel_group())
    apply_miss(model, MissConfig(r=8))
    materialize_random(model, "cpu", torch.float32, seed=3)
    return bool(torch.isfinite(model(**batch(config.vocab_size, 0)).logits).all())


@torch.no_grad()
def check_exports(name: str, reference: torch.nn.Module, base: Path, adapter: Path, root: Path, failures: list) -> None:
    """The TP adapter reassembles to the reference's D, and ``tools/reshard.py`` (from the base summary the adapter
    records) splits it as the run did; merged and PEFT exports give the reference's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from miss_ds.convert.merge import merge_to_hf
    from miss_ds.convert.peft import write_peft_adapter
    from miss_ds.convert.reshard import reshard_adapter

    meta, full = adapter_io.read_full_adapter(adapter)
    for key, value in full.items():
        check(f"{name} adapter file {key}", value, reference.get_parameter(key), failures)
    if adapter_io.read_adapter_config(reshard_adapter(adapter.parent, 2, root / "resharded"))["layouts"] \
            != meta["layouts"]:
        failures.append(f"{name}: tools/reshard.py splits the adapter otherwise than the TP=2 run")
    ids = batch(reference.config.vocab_size, 99)["input_ids"]
    want = reference.eval()(input_ids=ids).logits
    merge_to_hf(adapter.parent, base, root / "merged")
    check(f"{name} merged export logits", AutoModelForCausalLM.from_pretrained(root / "merged")(input_ids=ids).logits,
          want, failures)
    write_peft_adapter(adapter.parent, root / "peft", base)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), root / "peft")
    check(f"{name} PEFT export logits", peft(input_ids=ids).logits, want, failures)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True, help="tiny model:mode,... (keys of tests.tiny_models.TINY)")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    init_distributed()
    miss_engine.tensor_parallel_group(dist.get_world_size())
    failures: list[str] = []
    results = []
    for case in args.cases.split(","):
        tiny, mode = case.split(":")
        try:
            results.append(run(tiny, mode, Path(args.out), failures))
        except Exception as exc:  # noqa: BLE001 - reported per case; the ranks fail alike, so none waits
            failures.append(f"{case}: {type(exc).__name__}: {exc}")
            dist.barrier()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failures)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"results": results, "failures": sum(gathered, [])}), flush=True)
    exit_process(1 if any(gathered) else 0)


if __name__ == "__main__":
    main()
