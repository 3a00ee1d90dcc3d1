"""Fixed-length training sequences from encoded examples: one padded example per sequence, or several packed.

Padded sequences hold `input_ids`, `labels` and `attention_mask`; packed ones `input_ids`, `labels` and
`position_ids`, which restart at 0 at every example. Transformers reads those restarts as sequence
boundaries (a block-diagonal causal mask for sdpa/eager/flex attention, varlen kernels for flash
attention), so no token attends outside its example. Both are exactly `seq_len` long; padding carries
label `IGNORE_INDEX` and, in packed sequences, position id 0 (each padding token is a one-token block).
"""

import bisect

from miss_ds.data.encode import IGNORE_INDEX

Sequences = dict[str, list[list[int]]]


def pad_batch(batch: dict[str, list], seq_len: int, pad_id: int) -> Sequences:
    """`datasets.map(batched=True)` function: one sequence per example, right-padded.

    Examples must already fit in `seq_len` (longer ones are rejected before this).
    """
    out: Sequences = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        padding = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_id] * padding)
        out["labels"].append(labels + [IGNORE_INDEX] * padding)
        out["attention_mask"].append([1] * len(ids) + [0] * padding)
    return out


def pack_batch(batch: dict[str, list], seq_len: int, pad_id: int) -> Sequences:
    """`datasets.map(batched=True)` function over a window of examples: every example whole in one sequence,
    placed by `best_fit_decreasing`; position ids restart at each example.

    Examples must already fit in `seq_len` (longer ones are rejected before this).
    """
    out: Sequences = {"input_ids": [], "labels": [], "position_ids": []}
    for members in best_fit_decreasing(batch["length"], seq_len):
        ids = [token for i in members for token in batch["input_ids"][i]]
        padding = seq_len - len(ids)
        out["input_ids"].append(ids + [pad_id] * padding)
        out["labels"].append([label for i in members for label in batch["labels"][i]] + [IGNORE_INDEX] * padding)
        out["position_ids"].append([p for i in members for p in range(batch["length"][i])] + [0] * padding)
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins holding at most `capacity`: longest first (ties in index
    order), each into the bin it fills most (ties: the older bin), a new bin when none has room.

    A pure function of its input; bins come in the order they were opened, members in placement order.
    """
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), ascending
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            room, target = free.pop(slot)
            bins[target].append(index)
            bisect.insort(free, (room - length, target))
    return bins
