"""Write a Hugging Face checkpoint with random weights (sharded safetensors), e.g. to test per-rank loading.

    python tools/make_random_checkpoint.py --config configs/llama-70b-tp2.yaml --layers 8 --output /tmp/ckpt

These are not the weights a run with ``model.path: null`` draws (per TP shard): such a run saves its own base in
``<output_dir>/base``, and its adapters refuse any other (miss_ds.fingerprint).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from miss_ds.modeling import DTYPES, hf_config  # noqa: E402
from miss_ds.run_config import load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config whose model section describes the model")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--output", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args()
    cfg = load_config(args.config)
    config = hf_config(cfg.model)
    if args.layers:
        config.num_hidden_layers = args.layers
    torch.manual_seed(cfg.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype])
    model.save_pretrained(args.output, max_shard_size=args.max_shard_size)
    print(f"wrote {args.output}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
