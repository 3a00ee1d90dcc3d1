"""Deterministic, resumable micro-batches for data-parallel training.

Each epoch is a seeded permutation of the sequences. Step `s` of the epoch takes
the slice `[s * global, (s + 1) * global)` of the permutation
(`global = micro_batch_size * dp_size`), and dp rank `r` gets the `r`-th
micro-batch of that slice. So ranks never overlap, all ranks get the same number
of batches (the tail that would not fill a global batch is left out of that
epoch), and ranks that share a dp rank (tensor-parallel peers) get identical
batches by passing the same `dp_rank`.
"""

from collections.abc import Iterator
from itertools import islice

import numpy as np
from datasets import Dataset

from miss_ds.data.batch import Batch, as_one_row

MODEL_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")


class BatchIterator:
    """Endless iterator of LongTensor micro-batches of shape `(micro_batch_size, seq_len)` for one dp rank:
    `input_ids`, `labels` and, as the dataset has them, `attention_mask` (padded) or `position_ids` (packed).
    `one_row=True` (packed data only) yields each as `(1, micro_batch_size * seq_len)` (`as_one_row`).

    `state_dict()` / `load_state_dict()` save and restore the (epoch, position),
    so a resumed run yields exactly the batches the uninterrupted run would have.
    """

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        one_row: bool = False,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size is {micro_batch_size}: use a positive integer")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        self.batches_per_epoch = len(dataset) // (micro_batch_size * dp_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} sequences cannot fill one global batch of micro_batch_size "
                             f"{micro_batch_size} x dp_size {dp_size}: add data or use smaller batches")
        self._columns = [name for name in MODEL_COLUMNS if name in dataset.column_names]
        if one_row and "position_ids" not in self._columns:
            raise ValueError("one_row needs packed sequences (a position_ids column)")
        self.one_row = one_row
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches of `epoch` already yielded
        self._sequences = dataset.with_format("torch", columns=self._columns)
        self._order_epoch = -1
        self._order = np.arange(0)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = (self.position * self.dp_size + self.dp_rank) * self.micro_batch_size
        indices = self._epoch_order()[start : start + self.micro_batch_size]
        self.position += 1
        rows = self._sequences[indices.tolist()]
        batch = {name: rows[name].long() for name in self._columns}
        return as_one_row(batch) if self.one_row else batch

    def state_dict(self) -> dict[str, int]:
        """Where the iterator stands, plus the settings a resume must match."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "num_sequences": len(self._sequences),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; raises `ValueError` if it was taken with other data or settings."""
        for key in ("seed", "micro_batch_size", "dp_size", "num_sequences"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"cannot resume: saved {key} is {state[key]}, now {self.state_dict()[key]}")
        self.epoch = state["epoch"]
        self.position = state["position"]

    def _epoch_order(self) -> np.ndarray:
        """This epoch's permutation of sequence indices (cached for the epoch)."""
        if self._order_epoch != self.epoch:
            count = len(self._sequences)
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(count) if self.shuffle else np.arange(count)
            self._order_epoch = self.epoch
        return self._order


def eval_batches(dataset: Dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 one_row: bool = False) -> Iterator[Batch]:
    """One pass over `dataset` in order, sharded like `BatchIterator` (same count on every rank)."""
    batches = BatchIterator(dataset, micro_batch_size, dp_rank, dp_size, shuffle=False, one_row=one_row)
    return islice(batches, batches.batches_per_epoch)
