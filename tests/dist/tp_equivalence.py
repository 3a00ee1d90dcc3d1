"""Run under ``deepspeed --num_gpus N`` (DS_ACCELERATOR=cpu): a TP x DP MiSS run against a single-device run.

For each mode, builds the same tiny ragged Llama twice: a TP=`--tp` DeepSpeed engine (ZeRO `--zero`, `--accum`
gradient accumulation steps) trained by the trainer's ``StepRunner``, and a plain single-device reference trained
with torch AdamW on the whole global batch at once (every accumulation step of every data-parallel rank), its loss
the plain per-token mean. Labels are masked on a random prefix of every sequence, so micro-batches hold different
numbers of loss tokens. Asserts, at every step, equal loss and equal D gradients (the TP shard against the matching
slice of the reference), then equal D after the steps and an equal merged full weight gathered from the TP shards;
counts the collectives of one forward pass and asserts MiSS adds none to the frozen base's. Exits non-zero on any
mismatch.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import groups, safe_get_full_fp32_param, safe_get_full_grad

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from miss_ds import MissConfig, apply_miss, miss_layers  # noqa: E402
from miss_ds import engine as miss_engine  # noqa: E402
from miss_ds.distributed import ParallelLayout, exit_process, init_distributed  # noqa: E402
from miss_ds.parallel.autotp import shard_model  # noqa: E402
from miss_ds.run_config import ModelConfig, ParallelConfig, RunConfig, TrainConfig  # noqa: E402
from miss_ds.train.guard import NonFiniteGuard  # noqa: E402
from miss_ds.train.state import TrainState  # noqa: E402
from miss_ds.train.step import StepRunner  # noqa: E402
from tests.tp_gather import full_d, full_merged_weight  # noqa: E402
from tests.conftest import tiny_llama_config  # noqa: E402

# Adam divides by |grad|: with a tiny eps, a gradient element that is zero up to rounding gets a +-lr update whose
# sign depends on summation order (TP sums partials). A moderate eps keeps the comparison about TP, not rounding.
ADAM_EPS = 1e-4
LR = 1e-3
# Small enough to clip: the global gradient norm must count TP-split D once and replicated D once.
CLIP = 0.5
MODES = {"miss": dict(mode="miss", r=8), "mini": dict(mode="mini", r=8, mini_r=4), "bat": dict(mode="bat", r=4)}
# bat needs every shard to hold whole r x r blocks: an MLP width of 96 splits into 48s and 24s.
MODEL = {"miss": {}, "mini": {}, "bat": {"intermediate_size": 96}}


def model_config(mode: str, tp: int):
    """The mode's tiny Llama, with a KV head for each rank when TP=8."""
    return tiny_llama_config(**MODEL[mode], **({"num_key_value_heads": 8} if tp > 4 else {}))


def ds_config(zero: int, offload: bool, accum: int) -> dict:
    """The trainer's DeepSpeed config (``engine.deepspeed_config``) for these settings."""
    run = RunConfig(output_dir="unused", model=ModelConfig(dtype="float32"),
                    parallel=ParallelConfig(zero_stage=zero, offload_optimizer=offload),
                    train=TrainConfig(micro_batch_size=2, grad_accum_steps=accum, lr=LR, betas=(0.9, 0.99),
                                      eps=ADAM_EPS, grad_clip=CLIP))
    return miss_engine.deepspeed_config(run, "cpu")


class CollectiveCounter:
    """Counts torch.distributed collectives issued inside the context (all paths, DeepSpeed's included)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")

    def __enter__(self):
        self.count, self._saved = 0, {}
        for name in self.NAMES:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*a, _orig=original, **k):
                self.count += 1
                return _orig(*a, **k)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def batches(step: int, accum: int, dp: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels of one global batch, (accum, dp, 2, 11): labels masked on a random prefix."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (accum, dp, 2, 11), generator=g)
    masked = torch.arange(11) < torch.randint(0, 9, (accum, dp, 2, 1), generator=g)
    return ids, ids.masked_fill(masked, -100)


def reference_loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain per-token mean cross-entropy over the whole global batch (shifted by one, ignoring -100)."""
    logits = model(input_ids=ids.reshape(-1, ids.shape[-1])).logits[:, :-1]
    targets = labels.reshape(-1, labels.shape[-1])[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (targets != -100).sum()


def check(name: str, got: torch.Tensor, want: torch.Tensor, failures: list, tol: float = 1e-4) -> None:
    """Relative error ||got - want|| / ||want|| within ``tol`` (fp32 arithmetic in a different order)."""
    rel = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()
    if not rel <= tol:
        failures.append(f"{name}: relative error {rel:.3e}")


def run_mode(mode: str, args, tp: int, failures: list) -> dict:
    cfg = model_config(mode, tp)
    miss_cfg = MissConfig(init_weights=False, **MODES[mode])
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM
    base = LlamaForCausalLM(cfg)
    reference = copy.deepcopy(base)
    torch.manual_seed(1)
    apply_miss(reference, miss_cfg)
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    if tp > 1:
        shard_model(model, groups.get_tensor_model_parallel_group())
    apply_miss(model, miss_cfg)

    # Collectives of one forward: MiSS must add none to those of the frozen TP base.
    probe = batches(0, 1, 1, cfg.vocab_size)[0][0, 0]
    frozen = copy.deepcopy(base)
    if tp > 1:
        shard_model(frozen, groups.get_tensor_model_parallel_group())
    with torch.no_grad(), CollectiveCounter() as c_base:
        frozen(input_ids=probe)
    with torch.no_grad(), CollectiveCounter() as c_miss:
        model(input_ids=probe)
    if c_miss.count != c_base.count:
        failures.append(f"{mode}: forward collectives {c_miss.count} with MiSS vs {c_base.count} without")

    engine, *_ = miss_engine.initialize(model, ds_config(args.zero, args.offload, args.accum), tp_size=tp)
    ref_params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    ref_opt = torch.optim.AdamW(ref_params.values(), lr=LR, betas=(0.9, 0.99), eps=ADAM_EPS, weight_decay=0.0)
    layout = ParallelLayout(dist.get_rank(), dist.get_world_size(), tp)
    layers = dict(miss_layers(engine.module))
    data = [batches(step, args.accum, layout.dp, cfg.vocab_size) for step in range(args.steps)]
    feed = iter([{"input_ids": ids[i, layout.dp_rank], "labels": labels[i, layout.dp_rank],
                  "attention_mask": torch.ones_like(ids[i, layout.dp_rank])}
                 for ids, labels in data for i in range(args.accum)])
    device = torch.device("cpu")
    run_step = StepRunner(engine, lambda: next(feed), layout, device, args.accum,
                          NonFiniteGuard(engine, device, 1, TrainState()))
    grads = {}
    step_engine = engine.step

    def step_keeping_gradients(*a, **k):
        """The D gradients of the whole window, read where the optimizer is about to use them."""
        if engine.is_gradient_accumulation_boundary():
            for name, layer in layers.items():
                grad = safe_get_full_grad(layer.miss_block)
                assert grad is not None, f"no DeepSpeed gradient for {name}"
                grads[name] = grad.clone()
        return step_engine(*a, **k)
    engine.step = step_keeping_gradients
    losses = []
    for step, (ids, labels) in enumerate(data):
        result = run_step()
        ref_opt.zero_grad()
        ref_loss = reference_loss(reference, ids, labels)
        ref_loss.backward()
        check(f"{mode} step {step} loss", torch.tensor(result.loss), ref_loss.detach(), failures)
        for name, layer in layers.items():
            want = ref_params[name + ".miss_block"].grad
            check(f"{mode} step {step} grad {name}", grads[name], layer.shard_d(want), failures)
        torch.nn.utils.clip_grad_norm_(list(ref_params.values()), CLIP)
        ref_opt.step()
        losses.append(ref_loss.item())
    # After training, the engine's forward still issues only the base's TP all-reduces: the frozen TP shards stay
    # resident and are not re-gathered.
    with torch.no_grad(), CollectiveCounter() as c_engine:
        engine(input_ids=probe)
    if c_engine.count != c_base.count:
        failures.append(f"{mode}: engine forward issued {c_engine.count} collectives, the frozen base {c_base.count}")
    for name, layer in layers.items():
        want = ref_params[name + ".miss_block"].detach()
        master = safe_get_full_fp32_param(layer.miss_block)  # None without a ZeRO/bf16 optimizer: D is the master
        check(f"{mode} D {name}", layer.miss_block if master is None else master, layer.shard_d(want), failures,
              tol=1e-4)
        ref_layer = reference.get_submodule(name)
        with deepspeed.zero.GatheredParameters([layer.weight, layer.miss_block]):
            check(f"{mode} D gathered {name}", full_d(layer), want, failures, tol=1e-4)
            check(f"{mode} merged {name}", full_merged_weight(layer),
                  ref_layer.merged_linear().weight.detach(), failures, tol=1e-4)
    engine.destroy()
    return {"mode": mode, "losses": losses, "forward_collectives": c_miss.count, "engine_collectives": c_engine.count}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--modes", default="miss,mini,bat")
    p.add_argument("--float64", action="store_true", help="build and train everything in float64")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    if args.float64:
        torch.set_default_dtype(torch.float64)
    init_distributed()
    tp = args.tp
    miss_engine.tensor_parallel_group(tp)
    failures: list[str] = []
    results = [run_mode(m, args, tp, failures) for m in args.modes.split(",")]
    all_failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_failures, failures)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": tp, "zero": args.zero, "world": dist.get_world_size(),
                                      "results": results, "failures": sum(all_failures, [])}), flush=True)
    exit_process(1 if any(all_failures) else 0)


if __name__ == "__main__":
    main()
