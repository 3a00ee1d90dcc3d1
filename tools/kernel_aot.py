"""Compile miss_ds's Triton kernels for a GPU architecture without a GPU, and report what the compiler made.

Every autotune configuration of both kernels is compiled ahead of time for ``--arch`` (90: H100/H200) with the
specialisations Triton's JIT gives contiguous tensors (pointers, sizes and leading strides divisible by 16, unit
strides constant), by the ptxas that ships with Triton. One JSON line per kernel and configuration: shared memory,
whether the K loop is pipelined (cp.async) and how many tensor-core MMA instructions it holds (wgmma on Hopper).

    python tools/kernel_aot.py [--arch 90] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Per kernel: its tile names, the unit strides, the arguments divisible by 16 for contiguous operands.
KERNELS = {
    "forward": (("BM", "BN", "BK", "EVEN_K"), {"s_xk", "s_wk", "s_ar", "s_dn", "s_yn"},
                {"M", "N", "K", "s_xm", "s_wn", "s_am", "s_dr", "s_ym"}),
    "input_grad": (("BM", "BC", "BO", "EVEN_O"), {"s_yo", "s_wc", "s_gr", "s_xc"},
                   {"M", "C", "O", "s_ym", "s_wo", "s_gm", "s_xm"}),
}


def compile_all(arch: int, dtype: str, r: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from miss_ds.kernels import linear

    rows = []
    for kernel, (tiles, unit, div16) in KERNELS.items():
        tuner = getattr(linear, f"_{kernel}_kernel")
        fn = tuner
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        for config in tuner.configs:
            consts = {**config.kwargs, tiles[3]: True, **({"BR": max(16, triton.next_power_of_2(r))}
                                                          if kernel == "forward" else {})}
            signature, constexprs, attrs = {}, {}, {}
            for i, name in enumerate(fn.arg_names):
                if name in consts or name in unit:
                    signature[name], constexprs[(i,)] = "constexpr", consts.get(name, 1)
                else:
                    signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
                    if name.endswith("_ptr") or name in div16:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            ptx = compiled.asm["ptx"]
            rows.append({"kernel": kernel, "tile": [config.kwargs[t] for t in tiles[:3]],
                         "warps": config.num_warps, "stages": config.num_stages, "shared_bytes": compiled.metadata.shared,
                         "pipelined": "cp.async" in ptx, "wgmma": ptx.count("wgmma.mma_async"),
                         "mma": ptx.count("mma.sync")})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper, 80: Ampere)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--r", type=int, default=64)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 replaces the kernels by the interpreter: unset it to compile them")
    for row in compile_all(args.arch, args.dtype, args.r):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
