"""Rewrite a miss_ds adapter for another tensor-parallel size (e.g. trained at TP=4, used at TP=2).

    miss-ds-reshard --checkpoint CKPT --tp 2 --output OUT [--base BASE]

CKPT is a training checkpoint (out/checkpoints/step_00001000, its adapter/ is used) or an adapter dir.

The new partition is the one a run with --tp ranks makes (the same DeepSpeed split of the base model's
config: from --base/config.json, or rebuilt from the base summary stored in the adapter). A TP size the
adapter's mode cannot be split for (bat shards must hold whole r x r blocks) is refused, naming the layer.
With --base the base is checked against the adapter (config, shapes, fingerprint) first.

Only the adapter (D, and modules_to_save) is written. A training checkpoint needs no resharding to go on at another
TP size: `miss-ds-train --resume` takes it on any layout, Adam state and LR schedule included.
"""
from __future__ import annotations

import argparse
import sys

from .errors import positive_int, reports_input_errors
from .output import deepspeed_logs_to_stderr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="miss-ds-reshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint dir (uses its adapter/) or adapter dir")
    p.add_argument("--tp", type=positive_int, required=True, help="new tensor-parallel size")
    p.add_argument("--output", required=True, help="new (or empty) adapter directory")
    p.add_argument("--base", help="local base model directory (its config.json decides the split)")
    p.add_argument("--tp-grain-size", type=positive_int, default=1, help="the new run's parallel.tp_grain_size")
    return p.parse_args(argv)


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deepspeed_logs_to_stderr()
    from ..convert.reshard import reshard_adapter

    out = reshard_adapter(args.checkpoint, args.tp, args.output, args.base, args.tp_grain_size)
    print(f"adapter for tp_size={args.tp} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
