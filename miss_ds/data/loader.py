"""Deterministic, resumable micro-batches for data-parallel training, in one global order whatever the layout.

Each epoch is a seeded permutation of the sequences: the global order. It is cut into global batches of
`micro_batch_size * dp_size * accum_steps` sequences, one optimizer step each (the tail that would not fill one is
left out of that epoch). Micro-step `k` of a step takes the `k`-th run of `micro_batch_size * dp_size` sequences of
its global batch, and dp rank `r` the `r`-th micro-batch of that run. So ranks never overlap, all ranks get the same
number of batches, tensor-parallel peers get identical batches by passing the same `dp_rank`, and a step trains on
the same sequences for every split of its global batch into micro-batches, accumulation steps and ranks.

The state is the epoch and how many sequences of it were taken, counted globally: a checkpoint resumes at the exact
next sequence on another layout (more or fewer data-parallel ranks, another micro-batch size or accumulation).
"""

from collections.abc import Iterator

import numpy as np
import torch
from datasets import Dataset

from miss_ds.data.batch import Batch, as_one_row, check_resumable
from miss_ds.data.encode import IGNORE_INDEX

MODEL_COLUMNS = ("input_ids", "labels", "attention_mask", "position_ids")


def model_columns(dataset: Dataset, one_row: bool) -> list[str]:
    """The columns of `dataset` the model takes (`MODEL_COLUMNS`); `one_row` layout needs packed sequences."""
    columns = [name for name in MODEL_COLUMNS if name in dataset.column_names]
    if one_row and "position_ids" not in columns:
        raise ValueError("one_row needs packed sequences (a position_ids column)")
    return columns


class BatchIterator:
    """Endless iterator of LongTensor micro-batches of shape `(micro_batch_size, seq_len)` for one dp rank:
    `input_ids`, `labels` and, as the dataset has them, `attention_mask` (padded) or `position_ids` (packed).
    `one_row=True` (packed data only) yields each as `(1, micro_batch_size * seq_len)` (`as_one_row`).

    `state_dict()` / `load_state_dict()` save and restore the epoch and the sequences taken, so a resumed run
    yields exactly the batches the uninterrupted run would have (on any layout, see the module docstring).
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
        accum_steps: int = 1,
    ) -> None:
        if micro_batch_size < 1 or accum_steps < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size} and accum_steps {accum_steps} must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        self.global_batch = micro_batch_size * dp_size * accum_steps
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(dataset)} sequences cannot fill one global batch of micro_batch_size "
                             f"{micro_batch_size} x dp_size {dp_size} x accumulation {accum_steps}: add data or "
                             "use smaller batches")
        self._columns = model_columns(dataset, one_row)
        self.one_row = one_row
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.consumed = 0  # sequences of `epoch` taken by all ranks
        self._sequences = dataset.with_format("torch", columns=self._columns)
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank gets per epoch."""
        return self.steps_per_epoch * self.global_batch // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.consumed >= self.steps_per_epoch * self.global_batch:
            self.epoch += 1
            self.consumed = 0
        start = self.consumed + self.dp_rank * self.micro_batch_size
        indices = self._epoch_order()[start : start + self.micro_batch_size]
        self.consumed += self.micro_batch_size * self.dp_size
        rows = self._sequences[indices.tolist()]
        batch = {name: rows[name].long() for name in self._columns}
        return as_one_row(batch) if self.one_row else batch

    def state_dict(self) -> dict[str, int]:
        """Where the global order stands, plus what a resume must match (the data and its seed)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_sequences": len(self._sequences), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; raises `ValueError` if it was taken with other data, or at a point this layout's
        micro-steps cannot start from."""
        check_resumable(state, self.micro_batch_size * self.dp_size)
        for key in ("seed", "num_sequences"):
            if state[key] != self.state_dict()[key]:
                raise ValueError(f"cannot resume: the data changed since the checkpoint (saved {key} is "
                                 f"{state[key]}, now {self.state_dict()[key]})")
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]

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
    """One ordered pass over every sequence of `dataset`, sharded as a `BatchIterator` shards a global batch: rank
    `r` takes the `r`-th micro-batch of each run of `micro_batch_size * dp_size` sequences. Every rank gets the same
    number of full-size micro-batches (TP and DP collectives run in step): where the last run falls short, copies
    of the first sequence with every label `IGNORE_INDEX` fill it, which take no loss (weigh the loss by
    `loss_tokens`)."""
    columns = model_columns(dataset, one_row)
    sequences = dataset.with_format("torch", columns=columns)
    filler = {name: tensor.long()[None] for name, tensor in sequences[0].items()}
    filler["labels"] = torch.full_like(filler["labels"], IGNORE_INDEX)
    run = micro_batch_size * dp_size
    for first in range(dp_rank * micro_batch_size, -(-len(sequences) // run) * run, run):
        indices = list(range(first, min(first + micro_batch_size, len(sequences))))
        rows = sequences[indices] if indices else {name: filler[name][:0] for name in columns}
        missing = micro_batch_size - len(indices)
        batch = {name: torch.cat([rows[name].long(), filler[name].expand(missing, -1)]) for name in columns}
        yield as_one_row(batch) if one_row else batch
