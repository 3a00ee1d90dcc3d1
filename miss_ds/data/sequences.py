"""Fixed-length training sequences from encoded examples: padded one by one, or packed.

Both produce `input_ids`, `labels` and `attention_mask` of exactly `seq_len`
tokens; padding carries label `IGNORE_INDEX` and attention mask 0.
"""

from miss_ds.data.encode import IGNORE_INDEX

Sequences = dict[str, list[list[int]]]


def pad_batch(batch: dict[str, list], seq_len: int, pad_id: int) -> Sequences:
    """`datasets.map(batched=True)` function: one sequence per example, right-padded.

    Examples must already fit in `seq_len` (longer ones are rejected before this).
    """
    out: Sequences = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        _append_padded(out, ids, labels, seq_len, pad_id)
    return out


def pack_batch(batch: dict[str, list], seq_len: int, pad_id: int) -> Sequences:
    """`datasets.map(batched=True)` function: the batch's examples concatenated and cut
    into blocks of `seq_len`; only the batch's last block is padded.

    Attention crosses example boundaries inside a block (eos separates examples).
    """
    ids = [token for example in batch["input_ids"] for token in example]
    labels = [label for example in batch["labels"] for label in example]
    out: Sequences = {"input_ids": [], "labels": [], "attention_mask": []}
    for start in range(0, len(ids), seq_len):
        _append_padded(out, ids[start : start + seq_len], labels[start : start + seq_len], seq_len, pad_id)
    return out


def _append_padded(out: Sequences, ids: list[int], labels: list[int], seq_len: int, pad_id: int) -> None:
    padding = seq_len - len(ids)
    out["input_ids"].append(ids + [pad_id] * padding)
    out["labels"].append(labels + [IGNORE_INDEX] * padding)
    out["attention_mask"].append([1] * len(ids) + [0] * padding)
