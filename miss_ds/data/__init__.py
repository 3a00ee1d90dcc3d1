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
    saved = batches.state_dict()              # store with the checkpoint

    for batch in eval_batches(eval_ds, micro_batch_size=8, dp_rank=dp_rank, dp_size=dp_size):
        ...

- `DataConfig` (config.py): sources, row format ("text" | "instruction" | "chat"),
  field names, `seq_len`, packing, bad-row policy, eval hold-out; `validate()`.
- `build_datasets(cfg, tokenizer) -> (train_ds, eval_ds | None, DataStats)` (pipeline.py):
  reads and checks rows (bad rows are named by file and line), tokenises with
  `datasets.map`, pads or packs to `seq_len`. Labels are aligned with `input_ids`
  (the model shifts them) and are `IGNORE_INDEX` (-100) on prompts, non-assistant
  turns, bos and padding.
- `BatchIterator(ds, micro_batch_size, dp_rank, dp_size, seed)` (loader.py): endless,
  seeded per epoch, sharded over dp ranks, resumable via `state_dict()`; tensor-parallel
  peers pass the same `dp_rank`. `eval_batches(...)` is one ordered pass.
- `CHAT_TEMPLATE`, `train_tokenizer` (tokenizer.py) and `corpus.py` build the shipped
  `data/arith` corpus and tokenizer (see tools/make_corpus.py).
"""

from miss_ds.data.config import DataConfig
from miss_ds.data.encode import IGNORE_INDEX
from miss_ds.data.loader import Batch, BatchIterator, eval_batches
from miss_ds.data.pipeline import DataStats, SplitStats, build_datasets
from miss_ds.data.tokenizer import CHAT_TEMPLATE, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "Batch",
    "BatchIterator",
    "DataConfig",
    "DataStats",
    "SplitStats",
    "build_datasets",
    "eval_batches",
    "train_tokenizer",
]
