"""Convert a miss_ds adapter (or training checkpoint) for Hugging Face and for LoRA servers.

    miss-ds-convert --checkpoint CKPT [--base BASE] --output OUT --merge [--max-shard-size 5GB]
    miss-ds-convert --checkpoint CKPT [--base BASE] --output OUT --peft
    miss-ds-convert --checkpoint CKPT [--base BASE] --output OUT --lora

CKPT is a training checkpoint (out/checkpoints/step_00001000, its adapter/ is used) or an adapter dir. BASE is the
local Hugging Face directory of the base model; by default the one the adapter records (the run's model.path, or
the random base a run saves in <output_dir>/base) when it is here. The base is checked against the adapter (config,
shapes and the fingerprint of the base it was trained on): another base is refused by name.

--merge writes the base model with every D folded into its weight (same dtype as the base, sharded safetensors +
index, config/generation config/tokenizer copied from the base): load it with AutoModelForCausalLM.from_pretrained.
The base is streamed one tensor at a time on the CPU.
--peft writes a PEFT MiSS adapter (adapter_config.json + adapter_model.safetensors): PeftModel.from_pretrained(base,
OUTPUT), or AutoPeftModelForCausalLM.from_pretrained(OUTPUT) when the base is known.
--lora writes an exact PEFT LoRA adapter of rank r (modes miss and mini; bat is not low-rank): vLLM and SGLang
serve it, many adapters on one base (vLLM: --enable-lora --max-lora-rank >= r).
Every export of a training checkpoint also holds the run's config (miss_ds_run_config.json), from which
miss-ds-generate and miss-ds-eval take the prompt format the model was trained with.
"""
from __future__ import annotations

import argparse
import sys

from .errors import reports_input_errors
from .output import deepspeed_logs_to_stderr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="miss-ds-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint dir (uses its adapter/) or adapter dir")
    p.add_argument("--base", help="local Hugging Face directory of the base model (default: the one the adapter "
                                  "records, when it is here)")
    p.add_argument("--output", required=True, help="new (or empty) output directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--merge", action="store_true", help="write a merged full model")
    mode.add_argument("--peft", action="store_true", help="write a PEFT MiSS adapter")
    mode.add_argument("--lora", action="store_true", help="write an exact PEFT LoRA adapter (miss and mini)")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB",
                   help="largest output shard with --merge (e.g. 5GB, 500MB, 2GiB)")
    return p.parse_args(argv)


def shard_size(text: str) -> int:
    """argparse type: a positive size in bytes, written as transformers' ``save_pretrained`` takes it (an integer and
    a unit: KB, MB, GB, KiB, MiB, GiB); its own error is a traceback, and a size below 1 byte would put every tensor
    in a shard of its own."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write an integer and a unit, e.g. 5GB, 500MB or "
                                         "2GiB") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size: e.g. 5GB, 500MB or 2GiB")
    return size


@reports_input_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deepspeed_logs_to_stderr()
    if args.merge:
        from ..convert.merge import merge_to_hf

        stats = merge_to_hf(args.checkpoint, args.base, args.output, args.max_shard_size)
        print(f"merged {stats.merged} weights, replaced {stats.replaced} (modules_to_save), copied {stats.copied}: "
              f"{stats.shards} shard(s), {stats.total_bytes / 2**20:.1f} MiB in {args.output}")
    elif args.peft:
        from ..convert.peft import write_peft_adapter

        print(f"PEFT MiSS adapter written to {write_peft_adapter(args.checkpoint, args.output, args.base)}")
    else:
        from ..convert.lora import write_lora_adapter

        print(f"PEFT LoRA adapter written to {write_lora_adapter(args.checkpoint, args.output, args.base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
