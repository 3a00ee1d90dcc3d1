"""Random token batches for benchmarks: no files, no tokenisation, same interface as `BatchIterator`."""

import torch


class SyntheticBatches:
    """Endless `(micro_batch_size, seq_len)` batches of uniform random token ids, full attention, loss everywhere.

    Batch `k` of dp rank `r` is a pure function of (seed, k, r), so tensor-parallel peers see identical
    batches and a resumed run continues with the same ones.
    """

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, dp_rank: int = 0, seed: int = 0) -> None:
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.dp_rank, self.seed, self.position = dp_rank, seed, 0

    def __iter__(self) -> "SyntheticBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.position) * 4099 + self.dp_rank)
        self.position += 1
        ids = torch.randint(0, self.vocab_size, (self.micro_batch_size, self.seq_len), generator=g)
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]
