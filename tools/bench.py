"""Benchmarks that print figures side by side, measured in one run (never asserted in unit tests).

``step``: end-to-end training steps. Each variant is one launch of ``launch/train.py`` (a config plus ``--set``
overrides) or of a baseline script that prints one JSON line with ``step_s_median``; the table gives step time,
tokens/s per GPU, MFU, peak memory and time to the first step, each as a ratio to the reference variant.

    python tools/bench.py step --gpus 2 --ref floor \\
        --variant "floor=probe:.probes/baseline70b.py --mode tpbase --zinit --layers 80 --mbs 2" \\
        --variant "miss=train:configs/llama-70b-tp2.yaml" \\
        --variant "mini=train:configs/llama-70b-tp2.yaml miss.mode=mini miss.mini_r=64"

The baseline probe is not in this repository: it is the shared reference ``../shared/probes/baseline70b.py``
(the shared probes folder beside the checkout); copy it into the ignored ``.probes/`` first
(``mkdir -p .probes && cp ../shared/probes/baseline70b.py .probes/``). A missing probe script stops the run
before any variant starts.

``model``: in one process, training steps of a stack of Llama-7B-shape decoder layers (bf16, seq 4096, micro-batch
2, gradient checkpointing, torch's fused AdamW as in launch/train.py): the frozen base (input gradients only: the
floor), PEFT MiSS r64 and LoRA r16, and miss_ds in each mode (``miss`` also with every layer computed alone,
``miss-alone``: without the shared q/k/v and gate/up nodes of miss_ds.shared_input; and ``miss-full-recompute``:
recomputed layers compute agg(x) again instead of keeping it, plain checkpointing without miss_ds.recompute's
store), each as a ratio to the floor, with tokens/s, MFU, peak memory against the floor plus the variant's optimizer
state, and the first step's loss (the ``miss`` variants compute the same function). ``--rounds N`` alternates the
variants N times in the process, so that drift of the GPU's clocks between variants averages out of ratios a few
tenths of a percent apart.

    python tools/bench.py model --layers 8 --rounds 3
    python tools/bench.py model --layers 8 --variants frozen,miss,miss-fp8,mini-fp8   # FP8 base (miss_ds.quantize)
    python tools/bench.py model --layers 8 --variants frozen,miss,frozen-liger,miss-liger   # Liger's fused kernels

``pack``: packed against unpacked training on rows whose lengths follow a long-tailed (log-normal) spread, as in
SFT sets: one ``launch/train.py`` run per layout and attention implementation, same model, micro-batch and
seq_len. Reports the padding fraction of each training set, real (non-padding) tokens/s and step time, and
writes ``pack.json``. ``--preset tiny`` runs on CPU in a minute; ``--preset llama7b`` is the GPU measurement of
the README (8 Llama-7B-shape layers, bf16, seq 4096, micro-batch 2, random weights).

    python tools/bench.py pack --preset llama7b --attn sdpa,flex_attention --out runs/pack

``layer``: one linear layer's forward + backward (bf16 on GPU, fp32 on CPU): frozen base, miss_ds in each mode,
PEFT MiSS and LoRA, each as a ratio to the frozen base (CUDA events around ``--repeat`` calls queued back to back,
as a training step queues its layers);
``--profile`` adds each variant's top GPU kernels; ``--base-precision fp8`` adds the frozen base alone and
``miss``/``mini`` on an FP8 base (bf16 on CPU too).

``step`` takes an FP8 base as any other override: ``--variant "fp8=train:CONFIG model.base_precision=fp8"``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def launcher(gpus: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus)]


#: Where the baseline probes come from: shared reference scripts outside the repository.
PROBES_SOURCE = "../shared/probes"


def check_probes(specs: list[str]) -> None:
    """Exit naming the missing script, and where to get it, if a ``probe`` variant's script does not exist."""
    for spec in specs:
        kind, _, args = spec.partition("=")[2].partition(":")
        script = next(iter(shlex.split(args)), "")
        if kind == "probe" and not (ROOT / script).is_file():
            name = Path(script).name
            raise SystemExit(f"--variant {spec!r}: probe script {script} not found. The baseline probes are not "
                             f"in this repository: copy the shared reference {PROBES_SOURCE}/{name} into the "
                             f"ignored .probes/ folder (mkdir -p .probes && cp {PROBES_SOURCE}/{name} .probes/)")


def run_variant(spec: str, gpus: int, out_root: Path, work: Path, timeout: int) -> dict:
    """Run one variant ``name=kind:args`` and return its summary (with its name, command and exit code)."""
    name, _, rest = spec.partition("=")
    kind, _, args = rest.partition(":")
    words = shlex.split(args)
    log = out_root / f"{name}.log"
    if kind == "train":
        output_dir = work / name
        cmd = [*launcher(gpus), "launch/train.py", "--config", words[0], "--set", f"output_dir={output_dir}",
               *[a for o in words[1:] for a in ("--set", o)]]
    elif kind == "probe":
        cmd = [*launcher(gpus), *words]
    else:
        raise SystemExit(f"--variant {spec!r}: kind must be 'train' or 'probe'")
    start = time.time()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    result = {"name": name, "rc": rc, "wall_s": round(time.time() - start, 1), "cmd": shlex.join(cmd)}
    for line in log.read_text(errors="replace").splitlines():
        text = line.split("summary: ", 1)[-1].strip()
        if text.startswith("{") and "step_s_median" in text:
            result.update(json.loads(text))
    return result


def normalise(r: dict) -> dict:
    """Probe and trainer summaries name a few fields differently."""
    if "step_tokens_per_s_per_gpu" in r:  # the trainer's (real tokens; the benchmarks' data has no padding)
        r.setdefault("tokens_per_s_per_gpu", r["step_tokens_per_s_per_gpu"])
    if "peak_gib" in r:
        r.setdefault("peak_memory_gib", r["peak_gib"])
    if "init_s" in r:
        r.setdefault("first_step_s", r["init_s"])
    return r


def table(results: list[dict], ref: str) -> str:
    base = next((r for r in results if r["name"] == ref and "step_s_median" in r), None)
    rows = ["| variant | rc | s/step | x ref | tokens/s/GPU | MFU | peak GiB | first step s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "step_s_median" not in r:
            rows.append(f"| {r['name']} | {r['rc']} | failed (see {r['name']}.log) | | | | | |")
            continue
        ratio = f"{r['step_s_median'] / base['step_s_median']:.3f}" if base else "-"
        mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
        rows.append(f"| {r['name']} | {r['rc']} | {r['step_s_median']:.3f} | {ratio} | "
                    f"{r.get('tokens_per_s_per_gpu', 0):.0f} | {mfu} | {r.get('peak_memory_gib', 0):.1f} | "
                    f"{r.get('first_step_s', 0):.1f} |")
    return "\n".join(rows)


def cmd_step(args: argparse.Namespace) -> None:
    check_probes(args.variant)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.variant:
        results.append(normalise(run_variant(spec, args.gpus, out_root, Path(args.work or args.out), args.timeout)))
        print(json.dumps(results[-1]), flush=True)
    (out_root / "bench.json").write_text(json.dumps(results, indent=1))
    print(table(results, args.ref), flush=True)


MODEL_VARIANTS = ("frozen", "peft-miss", "peft-lora-r16", "miss", "miss-alone", "miss-full-recompute", "mini", "bat")
#: Also accepted by ``model --variants``, not run by default: miss_ds on an FP8 base (needs FP8 tensor cores).
#: ``miss-fp8-qkv-bf16``: q/k/v (a shared-input group) keep their bf16 weights, the other projections run on FP8.
FP8_MODEL_VARIANTS = ("miss-fp8", "mini-fp8", "miss-fp8-qkv-bf16")
#: Any variant with this suffix also runs Liger's fused kernels (``model.kernels: liger``; CUDA, liger-kernel).
#: Liger patches transformers' Llama module for the whole process, so these variants run after the others.
LIGER_SUFFIX = "-liger"


def _llama(args: argparse.Namespace):
    """The benchmark's Llama stack, random bf16 weights on the GPU, recompute on every layer, input grads on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=32000,
                         max_position_embeddings=args.seq)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    return config, model


def _adapted(name: str, model, r: int):
    """``model`` with variant ``name``'s adapter (the floor trains the final norm only, so that backward runs); a
    name ending in ``-liger`` also runs Liger's fused kernels (miss_ds.fused_kernels)."""
    from miss_ds import MissConfig, apply_miss, miss_layers
    from miss_ds.fused_kernels import apply_kernels
    from miss_ds.modeling import enable_recompute

    kernels = "liger" if name.endswith(LIGER_SUFFIX) else "hf"
    name = name.removesuffix(LIGER_SUFFIX)

    if name == "frozen":
        model.model.norm.weight.requires_grad_(True)
    elif name.startswith("peft"):
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        cfg = peft.MissConfig(r=r, target_modules=targets) if name == "peft-miss" else \
            peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets)
        model = peft.get_peft_model(model, cfg)  # PEFT's defaults: fp32 adapter weights
    else:
        mode = name.split("-")[0]
        apply_miss(model, MissConfig(r=r, mode=mode, mini_r=r))  # fp32 D, cast to bf16 in the forward
        if name.endswith("-alone"):
            for _, layer in miss_layers(model):
                layer.siblings = None
        if name.endswith("-fp8"):
            from miss_ds.quantize import quantize_base

            quantize_base(model)
        if name.endswith("-qkv-bf16"):
            for layer_name, layer in miss_layers(model):
                if not layer_name.endswith(("q_proj", "k_proj", "v_proj")):
                    layer.to_fp8()
    if name.endswith("-full-recompute"):  # plain checkpointing: without miss_ds.recompute's store
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable_recompute(model, None)
    model.enable_input_require_grads()
    apply_kernels(model, kernels)
    return model


def _shared_input_state(model) -> dict:
    """How many sibling groups (miss_ds.shared_input) the model holds and how many stopped computing together."""
    from miss_ds import miss_layers

    groups = {id(layer.siblings): layer.siblings for _, layer in miss_layers(model) if layer.siblings is not None}
    return {"shared_input_groups": len(groups), "groups_stopped": sum(g.stopped for g in groups.values())}


def cmd_model(args: argparse.Namespace) -> None:
    import gc

    import torch

    from miss_ds.flops import frozen_finetune_flops_per_token, peak_flops

    names = args.variants.split(",")
    liger = [n.endswith(LIGER_SUFFIX) for n in names]
    if liger != sorted(liger):
        raise SystemExit(f"--variants {args.variants}: list the {LIGER_SUFFIX} variants last (Liger patches "
                         "transformers' Llama code for the whole process: a plain variant after one would run it)")
    floor_name = next((n for n in names if n.removesuffix(LIGER_SUFFIX) == "frozen"), None)
    if floor_name is None:
        raise SystemExit(f"--variants {args.variants}: include frozen (or frozen{LIGER_SUFFIX}), the floor the "
                         "ratios are taken against")
    if args.rounds > 1 and len(set(liger)) > 1:
        raise SystemExit(f"--rounds {args.rounds} alternates the variants: give them all with {LIGER_SUFFIX} or all "
                         "without (Liger's patch would reach the plain variants' later rounds)")
    tokens = args.mbs * args.seq
    ids = torch.randint(0, 32000, (args.mbs, args.seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def timed_steps(model, optimizer, warmup: int) -> tuple[float, list[torch.Tensor]]:
        """The median time of ``--repeat`` training steps after ``warmup`` more, and every step's loss."""
        times, losses = [], []
        for _ in range(warmup + args.repeat):
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times[warmup:])[args.repeat // 2], losses

    results, live = {}, {}
    for _ in range(args.rounds):
        for name in names:
            if name in live:  # a later round: the variant's model as the first round left it, one step to warm up
                results[name]["round_step_s"].append(timed_steps(*live[name], warmup=1)[0])
                continue
            resident = torch.cuda.memory_allocated()  # the models kept for later rounds
            config, model = _llama(args)
            model = _adapted(name, model, args.r)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
            torch.cuda.reset_peak_memory_stats()
            step, losses = timed_steps(model, optimizer, args.warmup)
            state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t) and t.dim() > 0)
            results[name] = {"variant": name, "step_s": step, "round_step_s": [step],
                             "peak_gib": (torch.cuda.max_memory_allocated() - resident) / 2**30,
                             "optimizer_state_gib": state / 2**30,
                             "trainable_m": sum(p.numel() for p in params) / 1e6, "first_loss": losses[0].item(),
                             **_shared_input_state(model)}
            print(json.dumps(results[name]), flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model(input_ids=ids, labels=ids).loss.backward()
                    torch.cuda.synchronize()
                optimizer.zero_grad(set_to_none=True)
                print(f"{name}, one step:\n{prof.key_averages().table(sort_by='cuda_time_total', row_limit=25)}",
                      flush=True)
            if args.rounds > 1:
                live[name] = (model, optimizer)
            del model, optimizer, params
            gc.collect()
            torch.cuda.empty_cache()
    for r in results.values():  # the median of the rounds' medians: each round runs every variant once
        r["step_s"] = sorted(r["round_step_s"])[args.rounds // 2]
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = r["tokens_per_s"] * frozen_finetune_flops_per_token(config, args.seq) / peak_flops(ids.device,
                                                                                                    torch.bfloat16)
    results = list(results.values())
    floor = next(r for r in results if r["variant"] == floor_name)
    print(f"| {args.layers} layers {args.hidden}/{args.intermediate}, seq {args.seq}, mbs {args.mbs}, r={args.r}, "
          f"{torch.cuda.get_device_name()}, {args.rounds} round(s) | s/step | x floor | x floor by round | tokens/s "
          f"| MFU | peak GiB | x (floor + opt state) | first loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        budget = floor["peak_gib"] + r["optimizer_state_gib"]
        by_round = " / ".join(f"{a / b:.3f}" for a, b in zip(r["round_step_s"], floor["round_step_s"]))
        print(f"| {r['variant']} | {r['step_s']:.4f} | {r['step_s'] / floor['step_s']:.3f} | {by_round} | "
              f"{r['tokens_per_s']:.0f} | {r['mfu']:.3f} | {r['peak_gib']:.2f} | {r['peak_gib'] / budget:.3f} | "
              f"{r['first_loss']:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


PACK_PRESETS = {
    "tiny": {"model": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2},
             "dtype": "float32", "recompute": False, "seq_len": 256, "micro_batch_size": 4, "steps": 8, "rows": 2000},
    "llama7b": {"model": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 8,
                          "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
                "dtype": "bfloat16", "recompute": True, "seq_len": 4096, "micro_batch_size": 2, "steps": 12,
                "rows": 4000},
}
ARITH_TOKENIZER = ROOT / "data" / "arith" / "tokenizer"


def long_tailed_rows(count: int, seq_len: int, median: int, sigma: float, seed: int) -> list[dict[str, str]]:
    """Instruction rows of about n tokens each (shipped tokenizer), n log-normal around ``median``, cut to fit
    ``seq_len``: words that are one token each, 60% prompt and 40% response."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ARITH_TOKENIZER)
    words = [w.lstrip("\u2581") for w in tokenizer.get_vocab() if w.startswith("\u2581") and w[1:].isalpha()]
    words = sorted(w for w in words if len(tokenizer(f"{w} {w}", add_special_tokens=False)["input_ids"]) == 2)
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), sigma, count), 8, seq_len - 4).astype(int)
    rows = []
    for n in lengths:
        text = rng.choice(words, size=n)
        cut = max(1, int(0.6 * n))
        rows.append({"prompt": " ".join(text[:cut]), "response": " ".join(text[cut:])})
    return rows


def cmd_pack(args: argparse.Namespace) -> None:
    import yaml

    preset = PACK_PRESETS[args.preset]
    seq_len = args.seq_len or preset["seq_len"]
    out_root, work = Path(args.out), Path(args.work or args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = long_tailed_rows(args.rows or preset["rows"], seq_len, args.median or seq_len // 8, args.sigma, seed=0)
    data = work / "long_tailed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "output_dir": str(work / "unused"), "tokenizer": str(ARITH_TOKENIZER), "seed": 0,
        "model": {"config": {"model_type": "llama", **preset["model"], "max_position_embeddings": seq_len},
                  "random_init": True, "dtype": preset["dtype"], "gradient_checkpointing": preset["recompute"]},
        "miss": {"r": 64 if args.preset != "tiny" else 16, "mode": "miss"},
        "data": {"train_path": str(data), "format": "instruction", "seq_len": seq_len},
        "train": {"micro_batch_size": args.micro_batch_size or preset["micro_batch_size"],
                  "max_steps": args.steps or preset["steps"], "lr": 1.0e-4, "warmup_steps": 0},
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
    }
    base = out_root / "pack_base.yaml"
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    results = []
    for attn in args.attn.split(","):
        for pack in (False, True):
            name = f"{'packed' if pack else 'unpacked'}-{attn}"
            spec = f"{name}=train:{base} data.pack={str(pack).lower()} model.attn_implementation={attn}"
            r = run_variant(spec, args.gpus, out_root, work, args.timeout)
            r.update(attn=attn, pack=pack)
            if "step_s_median" in r:
                r["real_tokens_per_s_per_gpu"] = round(r["tokens"] / r["steps"] / r["step_s_median"] / args.gpus, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    for r in results:
        unpacked = next((u for u in results if u["attn"] == r["attn"] and not u["pack"]), {})
        if "real_tokens_per_s_per_gpu" in r and "real_tokens_per_s_per_gpu" in unpacked:
            r["x_unpacked"] = round(r["real_tokens_per_s_per_gpu"] / unpacked["real_tokens_per_s_per_gpu"], 3)
    lengths = sorted(len(row["prompt"].split()) + len(row["response"].split()) for row in rows)
    spread = {q: lengths[int(q / 100 * (len(lengths) - 1))] for q in (10, 50, 90, 99)}
    (out_root / "pack.json").write_text(json.dumps({"preset": args.preset, "seq_len": seq_len, "rows": len(rows),
                                                    "words_percentiles": spread, "results": results}, indent=1))
    print(f"rows: {len(rows)}, words per row p10/p50/p90/p99: {'/'.join(str(v) for v in spread.values())}, "
          f"seq_len {seq_len}")
    print("| variant | rc | padding | s/step | real tokens/s/GPU | x unpacked | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "real_tokens_per_s_per_gpu" not in r:
            print(f"| {r['name']} | {r['rc']} | failed (see {r['name']}.log) | | | | |")
            continue
        print(f"| {r['name']} | {r['rc']} | {r['padding_fraction']:.3f} | {r['step_s_median']:.3f} | "
              f"{r['real_tokens_per_s_per_gpu']:.0f} | {r.get('x_unpacked', 1.0):.2f} | "
              f"{r.get('peak_memory_gib', 0):.1f} |", flush=True)


def cmd_layer(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from miss_ds import MissConfig, MissLinear

    cuda = torch.cuda.is_available()
    fp8 = args.base_precision == "fp8"
    device, dtype = ("cuda" if cuda else "cpu"), (torch.bfloat16 if cuda or fp8 else torch.float32)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)

    def frozen() -> nn.Module:
        return nn.Linear(args.in_features, args.out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)

    variants = {"frozen": frozen()}
    for mode in ("miss", "mini", "bat"):
        cfg = MissConfig(r=args.r, mode=mode, mini_r=args.r, target_modules=["x"])
        variants[f"miss_ds-{mode}"] = MissLinear(frozen(), cfg)
    try:
        import peft

        for label, pcfg in (("peft-miss", peft.MissConfig(r=args.r, target_modules=["0"])),
                            ("peft-lora-r16", peft.LoraConfig(r=16, target_modules=["0"]))):
            variants[label] = peft.get_peft_model(nn.Sequential(frozen()), pcfg)
    except ImportError:
        pass
    if fp8:
        from miss_ds.fp8 import FP8Weight, frozen_linear_fp8

        class FrozenFP8(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.base = FP8Weight.from_weight(frozen().weight)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return frozen_linear_fp8(x, self.base)

        variants["frozen-fp8"] = FrozenFP8()
        for mode in ("miss", "mini"):
            variants[f"miss_ds-{mode}-fp8"] = MissLinear(frozen(), MissConfig(r=args.r, mode=mode, mini_r=args.r))
            variants[f"miss_ds-{mode}-fp8"].to_fp8()

    def timed(work) -> float:
        """Seconds per call of ``work()`` in steady state: ``--repeat`` calls queued back to back after the warm-up,
        as a training step queues its layers, so that the CPU runs ahead of the GPU and launch latency is hidden as
        it is there (a synchronised single call would add the CPU's dispatch time of the many small launches).
        CUDA events on GPU."""
        for _ in range(args.warmup):
            work()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            work()
        if cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / args.repeat
        return (time.perf_counter() - t0) / args.repeat

    def profile(module: nn.Module) -> str:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                module(x).backward(grad)
            torch.cuda.synchronize()
        return prof.key_averages().table(sort_by="cuda_time_total", row_limit=8)

    rows, tables = [], {}
    for name, module in variants.items():
        rows.append((name, timed(lambda: module(x).backward(grad))))
        if args.profile and cuda:
            tables[name] = profile(module)
    base = rows[0][1]
    print(f"| layer {args.tokens}x{args.in_features}->{args.out_features}, r={args.r}, {dtype} on {device} | ms | x frozen |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.3f} | {t / base:.3f} |", flush=True)
    for name, table in tables.items():
        print(f"\n{name} (3 forward+backward):\n{table}")
    if args.in_features % args.r == 0:
        # The choices of miss_ds's additive path against their alternatives, each timed alone: the chunk passes as
        # GEMMs with the 0/1 chunk matrix or as plain PyTorch would (a reduction over a reshaped view; a repeat);
        # which product the other accumulates onto in forward; the input gradient of three siblings (q, k, v)
        # accumulated in one buffer or added up as autograd adds separate nodes' gradients; bat's merged weight.
        from miss_ds import functional as MF

        xs, g = x.detach(), torch.randn(args.tokens, args.r, device=device, dtype=dtype)
        ww, dd = variants["frozen"].weight, torch.randn(args.r, args.out_features, device=device, dtype=dtype)

        def _accumulated(dx):
            for _ in range(3):
                dx.addmm_(grad, ww)
            return dx

        parts = {"aggregate: x @ E^T (miss_ds)": lambda: MF.aggregate(xs, args.r),
                 "aggregate: view + fp32 sum": lambda: xs.view(args.tokens, -1, args.r).sum(-2, dtype=torch.float32)
                 .to(dtype),
                 "spread: g @ E (miss_ds)": lambda: MF.spread(g, args.in_features, args.r),
                 "spread: repeat": lambda: g.repeat(1, args.in_features // args.r),
                 "forward: agg @ D, x W^T accumulates onto it (miss_ds)": lambda: (
                     MF.aggregate(xs, args.r) @ dd).addmm_(xs, ww.t()),
                 "forward: x W^T, agg @ D accumulates onto it": lambda: (xs @ ww.t()).addmm_(MF.aggregate(xs, args.r), dd),
                 "forward: x W^T alone": lambda: xs @ ww.t(),
                 "input grad of 3 siblings: g @ E, 3 GEMMs accumulate onto it (miss_ds)": lambda: _accumulated(
                     MF.spread(g, args.in_features, args.r)),
                 "input grad of 3 siblings: 3 GEMMs and g @ E, added (autograd)": lambda: (
                     grad @ ww + grad @ ww + grad @ ww + MF.spread(g, args.in_features, args.r))}
        if args.out_features % args.r == 0:
            d_bat = torch.randn(args.out_features // args.r, args.r, args.r, device=device, dtype=dtype) * 1e-2
            bat = MF.MissGeometry("bat", args.r, 1, args.in_features, args.out_features)
            parts.update({"bat merged weight: W + W_ab D_a + D_a in one add and one batched GEMM (miss_ds)": lambda: (
                              MF.bat_merged_weight(ww, d_bat, args.r)),
                          "bat merged weight: W + delta_weight (the update written, then added)": lambda: (
                              MF.merge(ww, d_bat, bat))})
        parts.update(_wide_design_choices(xs, grad, ww, args.r))
        if fp8 and cuda:
            parts.update(_fp8_design_choices(xs, grad, ww))
        print(f"\n| design choice, {args.tokens}x{args.in_features}->{args.out_features}, r={args.r} | us |\n|---|---|")
        for name, work in parts.items():
            print(f"| {name} | {timed(work) * 1e6:.1f} |", flush=True)


def _wide_design_choices(x, dy, w, r: int) -> dict:
    """D^T kept beside W as [W | D^T] (out x (in + r)), so that the frozen GEMMs also make MiSS's products, against
    what miss_ds does, for a shared-input group of n projections (n = 1, 2, 3; each x -> out as W): in forward one
    copy of x beside agg(x) for the group and [x | agg] [W | D^T]^T per projection (no delta written and read back);
    in backward [dx | g] = sum_p dy_p [W | D^T] (no read of dy for g), then dx plus g spread, as a broadcast add
    (contiguous dx) or onto the strided view. And D's gradient written in fp32 by the GEMM (``out_dtype``) against
    a bf16 GEMM and a cast. Measured for issue 23 and not used (docs/performance.md): the GEMMs over in + r lose
    what the passes save."""
    import torch

    from miss_ds import functional as MF

    tokens, k = x.shape
    d = torch.randn(r, w.shape[0], device=x.device, dtype=x.dtype)
    e = MF.chunk_matrix(r, k, 0, x.dtype, x.device)
    wide = torch.cat([w, d.t()], dim=1)
    agg = MF.aggregate(x, r)

    def forward_plain(n):
        a = MF.aggregate(x, r)
        return [(a @ d).addmm_(x, w.t()) for _ in range(n)]

    def forward_wide(n):
        x_ext = torch.empty(tokens, k + r, device=x.device, dtype=x.dtype)
        x_ext[:, :k].copy_(x)
        x_ext[:, k:] = MF.aggregate(x, r)
        return [x_ext @ wide.t() for _ in range(n)]

    def backward_plain(n):
        g = dy @ d.t()
        for _ in range(n - 1):
            g.addmm_(dy, d.t())
        dx = MF.spread(g, k, r)
        for _ in range(n):
            dx.addmm_(dy, w)
        return dx

    def wide_sum(n):
        z = dy @ wide
        for _ in range(n - 1):
            z.addmm_(dy, wide)
        return z

    def backward_wide_broadcast(n):
        z = wide_sum(n)
        return (z[:, :k].view(tokens, k // r, r) + z[:, None, k:]).view(tokens, k)

    def backward_wide_strided(n):
        z = wide_sum(n)
        return z[:, :k].addmm_(z[:, k:].clone(), e)

    parts = {}
    for n in (1, 2, 3):
        parts.update({
            f"{n} projection(s), forward: agg, each agg @ D with x W^T onto it (miss_ds)": lambda n=n: forward_plain(n),
            f"{n} projection(s), forward: [x | agg] once, each [x | agg] [W | D^T]^T": lambda n=n: forward_wide(n),
            f"{n} projection(s), input grad: g (n GEMMs), g @ E, n GEMMs onto it (miss_ds)":
                lambda n=n: backward_plain(n),
            f"{n} projection(s), input grad: sum dy [W | D^T], + g spread (broadcast add)":
                lambda n=n: backward_wide_broadcast(n),
            f"{n} projection(s), input grad: sum dy [W | D^T], g @ E onto the strided view":
                lambda n=n: backward_wide_strided(n)})
    parts["D's gradient: agg^T dy, then cast to fp32 (miss_ds)"] = lambda: (agg.t() @ dy).float()
    if x.is_cuda:
        parts["D's gradient: agg^T dy written in fp32 (out_dtype)"] = lambda: torch.mm(agg.t(), dy,
                                                                                        out_dtype=torch.float32)
    return parts


def _fp8_design_choices(x, dy, w) -> dict:
    """The FP8 base's choices against their alternatives: the per-token quantiser and the transpose the
    input-gradient GEMM reads as Triton kernels, compiled or eager; the transpose made per call (one FP8 copy) or
    kept (a second copy); the GEMMs with and without Hopper's fast accumulation; and the bf16 GEMMs they replace."""
    import torch

    from miss_ds import fp8

    base = fp8.FP8Weight.from_weight(w)
    kept = fp8.transposed(base.data)
    dq, ds = fp8.quantize_rows(dy, base.scale)
    compiled_quantize = torch.compile(fp8.quantize_rows_eager, dynamic=True)
    compiled_transpose = torch.compile(lambda t: t.t().contiguous(), dynamic=True)
    as_bytes = base.data.view(torch.uint8)
    xq, xs = fp8.quantize_rows(x)

    def forward_gemm(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(xq, base.data.t(), scale_a=xs, scale_b=base.scale, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    def input_grad_gemm(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(dq, kept.t(), scale_a=ds, scale_b=base.unit, out_dtype=torch.bfloat16,
                                use_fast_accum=fast)

    # Hopper's fast accumulation skips the FP8 GEMM's periodic promotion to fp32: its error, over the same
    # quantised operands against float64, is printed beside the plain GEMM's.
    w64 = fp8.dequantize_rows(base.data, base.scale.t()).double()
    for label, gemm, exact in (("forward", forward_gemm, fp8.dequantize_rows(xq, xs).double() @ w64.t()),
                               ("input grad", input_grad_gemm, fp8.dequantize_rows(dq, ds).double()
                                @ fp8.dequantize_rows(base.data, base.unit).double())):
        errors = {fast: ((gemm(fast).double() - exact).norm() / exact.norm()).item() for fast in (False, True)}
        print(f"fp8 {label} GEMM against float64 over its quantised operands: plain {errors[False]:.2e}, fast "
              f"accumulation {errors[True]:.2e}")
        del exact
    return {"fp8: quantise x per token, Triton (miss_ds)": lambda: fp8.quantize_rows(x),
            "fp8: quantise x per token, torch.compile": lambda: compiled_quantize(x, None),
            "fp8: quantise x per token, eager": lambda: fp8.quantize_rows_eager(x, None),
            "fp8: quantise dy times W's row scales, Triton (miss_ds)": lambda: fp8.quantize_rows(dy, base.scale),
            "fp8: transpose W_q, Triton (miss_ds)": lambda: fp8.transposed(base.data),
            "fp8: transpose W_q, torch.compile": lambda: compiled_transpose(as_bytes),
            "fp8: transpose W_q, eager": lambda: base.data.t().contiguous(),
            "fp8: forward GEMM x_q W_q^T": lambda: fp8.linear_fp8(x, base, fp8.quantize_rows(x)),
            "fp8: forward GEMM alone": lambda: forward_gemm(False),
            "fp8: forward GEMM alone, fast accumulation": lambda: forward_gemm(True),
            "bf16: forward GEMM x W^T": lambda: x @ w.t(),
            "fp8: input grad, transpose per call (miss_ds)": lambda: fp8.input_grad_fp8(dy, base),
            "fp8: input grad, transposed copy kept": lambda: torch._scaled_mm(
                fp8.quantize_rows(dy, base.scale)[0], kept.t(), scale_a=ds, scale_b=base.unit,
                out_dtype=torch.bfloat16),
            "fp8: input grad GEMM alone": lambda: input_grad_gemm(False),
            "fp8: input grad GEMM alone, fast accumulation": lambda: input_grad_gemm(True),
            "bf16: input grad GEMM dy W": lambda: dy @ w}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="end-to-end training steps of several variants")
    s.add_argument("--variant", action="append", required=True, help="name=train:CONFIG [k=v ...] | name=probe:SCRIPT ARGS")
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--ref", default="floor", help="variant the ratios are taken against")
    s.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    s.add_argument("--work", default=None, help="where training runs write checkpoints (default: --out)")
    s.add_argument("--timeout", type=int, default=600)
    s.set_defaults(func=cmd_step)
    m = sub.add_parser("model", help="training steps of a Llama stack, one process, every variant (CUDA)")
    m.add_argument("--variants", default=",".join(MODEL_VARIANTS),
                   help=f"comma list of {', '.join(MODEL_VARIANTS + FP8_MODEL_VARIANTS)}, each also with "
                        f"{LIGER_SUFFIX} (listed last)")
    m.add_argument("--layers", type=int, default=8)
    m.add_argument("--hidden", type=int, default=4096)
    m.add_argument("--intermediate", type=int, default=11008)
    m.add_argument("--heads", type=int, default=32)
    m.add_argument("--kv-heads", type=int, default=32)
    m.add_argument("--seq", type=int, default=4096)
    m.add_argument("--mbs", type=int, default=2)
    m.add_argument("--r", type=int, default=64)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--repeat", type=int, default=5)
    m.add_argument("--rounds", type=int, default=1,
                   help="time every variant this many times, alternating (the models kept on the GPU); s/step is "
                        "the median of the rounds' medians, peak memory is the first round's, less the other models")
    m.add_argument("--out", default=None, help="write the results as JSON here")
    m.add_argument("--profile", action="store_true", help="print each variant's top GPU kernels over one step")
    m.set_defaults(func=cmd_model)
    k = sub.add_parser("pack", help="packed against unpacked training on long-tailed row lengths")
    k.add_argument("--preset", choices=sorted(PACK_PRESETS), default="tiny")
    k.add_argument("--attn", default="sdpa", help="comma list of attention implementations (model.attn_implementation)")
    k.add_argument("--gpus", type=int, default=1)
    k.add_argument("--rows", type=int, default=None, help="rows generated (default: the preset's)")
    k.add_argument("--seq-len", type=int, default=None)
    k.add_argument("--median", type=int, default=None, help="median row length in tokens (default: seq_len / 8)")
    k.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the row lengths")
    k.add_argument("--micro-batch-size", type=int, default=None)
    k.add_argument("--steps", type=int, default=None)
    k.add_argument("--out", default=os.environ.get("OUT", "runs/bench-pack"))
    k.add_argument("--work", default=None, help="where the data and the runs go (default: --out)")
    k.add_argument("--timeout", type=int, default=600)
    k.set_defaults(func=cmd_pack)
    l = sub.add_parser("layer", help="one layer's forward + backward")
    l.add_argument("--tokens", type=int, default=8192)
    l.add_argument("--in-features", type=int, default=4096)
    l.add_argument("--out-features", type=int, default=4096)
    l.add_argument("--r", type=int, default=64)
    l.add_argument("--warmup", type=int, default=5)
    l.add_argument("--repeat", type=int, default=20)
    l.add_argument("--profile", action="store_true", help="print each variant's top GPU kernels (CUDA)")
    l.add_argument("--base-precision", choices=("bf16", "fp8"), default="bf16",
                   help="fp8: also time the frozen base alone and miss/mini on an FP8 base")
    l.set_defaults(func=cmd_layer)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
