"""Random token batches for benchmarks: no files, no tokenisation, same interface as `BatchIterator`."""

import torch

from miss_ds.data.batch import check_resumable


class SyntheticBatches:
    """Endless `(micro_batch_size, seq_len)` batches of uniform random token ids, full attention, loss everywhere.

    Sequence `i` of the global order is a pure function of (seed, i), and dp rank `r` takes the `r`-th micro-batch of
    each run of `micro_batch_size * dp_size` sequences, as `BatchIterator` does: tensor-parallel peers see identical
    batches and a resumed run continues with the same sequences, on any layout.
    """

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0) -> None:
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.consumed = dp_rank, dp_size, seed, 0

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed + self.dp_rank * self.micro_batch_size
        ids = torch.stack([self._sequence(first + i) for i in range(self.micro_batch_size)])
        self.consumed += self.micro_batch_size * self.dp_size
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def _sequence(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return torch.randint(0, self.vocab_size, (self.seq_len,), generator=g)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "consumed": self.consumed, "seed": self.seed, "global_batch": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_resumable(state, self.micro_batch_size * self.dp_size)
        self.consumed = state["consumed"]
