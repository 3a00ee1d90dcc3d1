"""Benchmarks that print figures side by side, measured in one run (never asserted in unit tests).

``step``: end-to-end training steps. Each variant is one launch of ``launch/train.py`` (a config plus ``--set``
overrides) or of a baseline script that prints one JSON line with ``step_s_median``; the table gives step time,
tokens/s per GPU, MFU, peak memory and time to the first step, each as a ratio to the reference variant.

    python tools/bench.py step --gpus 2 --ref floor \\
        --variant "floor=probe:.probes/baseline70b.py --mode tpbase --zinit --layers 80 --mbs 2" \\
        --variant "miss=train:configs/llama-70b-tp2.yaml" \\
        --variant "mini=train:configs/llama-70b-tp2.yaml miss.mode=mini miss.mini_r=64"

``layer``: one linear layer's forward + backward (bf16 on GPU, fp32 on CPU): frozen base, miss_ds in each mode,
PEFT MiSS and LoRA, each as a ratio to the frozen base (CUDA events, median of repeats).
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
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in args.variant:
        results.append(normalise(run_variant(spec, args.gpus, out_root, Path(args.work or args.out), args.timeout)))
        print(json.dumps(results[-1]), flush=True)
    (out_root / "bench.json").write_text(json.dumps(results, indent=1))
    print(table(results, args.ref), flush=True)


def cmd_layer(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from miss_ds import MissConfig, MissLinear

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)

    def frozen() -> nn.Module:
        return nn.Linear(args.in_features, args.out_features, bias=False, device=device, dtype=dtype).requires_grad_(False)

    variants = {"frozen": frozen()}
    for mode in ("miss", "mini", "bat"):
        cfg = MissConfig(r=args.r, mode=mode, mini_r=args.r, target_modules=["x"], adapter_dtype="model")
        variants[f"miss_ds-{mode}"] = MissLinear(frozen(), cfg)
    try:
        import peft

        for label, pcfg in (("peft-miss", peft.MissConfig(r=args.r, target_modules=["0"])),
                            ("peft-lora-r16", peft.LoraConfig(r=16, target_modules=["0"]))):
            variants[label] = peft.get_peft_model(nn.Sequential(frozen()), pcfg)
    except ImportError:
        pass

    def timed(module: nn.Module) -> float:
        times = []
        for i in range(args.warmup + args.repeat):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            module(x).backward(grad)
            if cuda:
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                times.append(elapsed)
        return sorted(times)[len(times) // 2]

    base = timed(variants["frozen"])
    print(f"| layer {args.tokens}x{args.in_features}->{args.out_features}, r={args.r}, {dtype} on {device} | ms | x frozen |")
    print("|---|---|---|")
    for name, module in variants.items():
        t = base if name == "frozen" else timed(module)
        print(f"| {name} | {t * 1e3:.3f} | {t / base:.3f} |", flush=True)


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
    l = sub.add_parser("layer", help="one layer's forward + backward")
    l.add_argument("--tokens", type=int, default=8192)
    l.add_argument("--in-features", type=int, default=4096)
    l.add_argument("--out-features", type=int, default=4096)
    l.add_argument("--r", type=int, default=64)
    l.add_argument("--warmup", type=int, default=5)
    l.add_argument("--repeat", type=int, default=20)
    l.set_defaults(func=cmd_layer)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
