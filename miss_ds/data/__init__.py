"""Training data for miss_ds: rows on disk -> fixed-length token sequences -> sharded micro-batches.

Typical use in a trainer::

    from transformers import AutoTokenizer
    from miss_ds.data import BatchIterator, DataConfig, build_datasets, eval_batches

    cfg = DataConfig(train_path="data/arith/train.jsonl", eval_path="data/arith/eval.jsonl",
                     format="instruction", seq_len=64)
    tokenizer = AutoTokenizer.from_pretrained("data/arith/tokenizer")
    train_ds, eval_ds, stats = build_datasets(cfg, tokenizer)

    batches = BatchIterator(train_ds, micro_batch_size=8, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed)
    batches.load_state_dict(saved)            # optional: resume where a checkpoint left off
    batch = next(batches)                     # {"input_ids", "labels", "attention_mask"}: LongTensor (8, 64)
    tokens = count_tokens(batch)              # non-padding tokens
    saved = batches.state_dict()              # store with the checkpoint

    for batch in eval_batches(eval_ds, micro_batch_size=8, dp_rank=dp_rank, dp_size=dp_size):
        ...

- `DataConfig` (config.py): source or mixed `sources` (`SourceConfig`), row format
  ("text" | "instruction" | "chat"), field names, `seq_len`, packing, bad-row policy,
  eval hold-out; `validate()`.
- `build_datasets(cfg, tokenizer) -> (train_ds, eval_ds | None, DataStats)` (pipeline.py):
  reads and checks rows (bad rows are named by file and line), tokenises with
  `datasets.map`, mixes sources by weight (mixing.py), pads or packs to `seq_len`
  (sequences.py). Labels are aligned with `input_ids` (the model shifts them) and are
  `IGNORE_INDEX` (-100) on prompts, non-assistant turns, each example's first token and padding.
  Packed sequences carry `position_ids` restarting at every example instead of `attention_mask`.
  Each source's eval rows make sequences of their own (column `eval_set`); `split_eval_sets` splits them by source.
- `BatchIterator(ds, micro_batch_size, dp_rank, dp_size, seed)` (loader.py): endless,
  seeded per epoch, sharded over dp ranks, resumable via `state_dict()`; tensor-parallel
  peers pass the same `dp_rank`. `eval_batches(...)` is one ordered pass over every sequence
  (the last micro-batches filled with rows that take no loss).
- `count_tokens(batch)`, `loss_tokens(batch)`, `as_one_row(batch)` (batch.py): real tokens of any batch, and
  those that take a loss; a packed micro-batch as one row, for flash attention's varlen path.
- `SyntheticBatches(vocab_size, seq_len, micro_batch_size, dp_rank, dp_size, seed)` (synthetic.py): random
  tokens for benchmarks (`data.synthetic: true`), with no files and no `datasets` import.
"""

import importlib

# Names are imported on first use, so that a benchmark run on synthetic batches needs neither `datasets`
# nor `pyarrow` (module name of each public name).
_EXPORTS = {
    "DataConfig": "config", "SourceConfig": "config", "IGNORE_INDEX": "encode", "Batch": "batch",
    "as_one_row": "batch", "count_tokens": "batch", "loss_tokens": "batch", "BatchIterator": "loader",
    "eval_batches": "loader",
    "DataStats": "pipeline", "SourceStats": "pipeline", "SplitStats": "pipeline", "build_datasets": "pipeline",
    "split_eval_sets": "pipeline",
    "SyntheticBatches": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'miss_ds.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"miss_ds.data.{_EXPORTS[name]}"), name)
