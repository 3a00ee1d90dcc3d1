"""`DataConfig`: everything the data pipeline needs to know, checked before any work starts."""

from dataclasses import dataclass
from typing import Literal

FORMATS = ("text", "instruction", "chat")
BAD_ROW_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    """Where the data lives, how rows look, and how they become training sequences."""

    train_path: str = ""
    """A local .jsonl/.json/.parquet/.arrow file, a directory of such files, a directory
    written by `Dataset.save_to_disk`, or a `datasets` name already in the local cache."""

    eval_path: str | None = None
    """Same kinds of source as `train_path`; None means no eval set, or carve one out
    of train with `eval_fraction`."""

    format: Literal["text", "instruction", "chat"] = "instruction"
    """"text": plain LM loss on `text_field`; "instruction": loss on `response_field`
    only; "chat": loss on assistant turns of `messages_field` only."""

    # Column names read for the chosen format; other columns are ignored.
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    """A list of {"role", "content"} objects; roles are those of the tokenizer's chat template."""

    prompt_separator: str = "\n"
    """Text placed between prompt and response in the "instruction" format; a generation
    prompt must end with it too, so the model sees at inference what it saw in training."""

    seq_len: int = 512
    """Length in tokens of every sequence handed to the model."""

    pack: bool = False
    """Place several whole examples in each `seq_len` sequence (best-fit-decreasing over windows of
    examples) instead of one padded example per sequence. Position ids restart at every example, which
    confines attention to it: packed training computes the loss and gradients of unpacked training.
    Either way an example longer than `seq_len` is a bad row."""

    on_bad_row: Literal["error", "skip"] = "error"
    """"error": raise, quoting the bad rows by file and line; "skip": drop them and count them in the stats."""

    eval_fraction: float = 0.0
    """When `eval_path` is None, hold out this fraction of the train rows as eval (0 = none)."""

    # Split names, used only for sources that hold several splits (`datasets` names,
    # `save_to_disk` directories of a `DatasetDict`).
    train_split: str = "train"
    eval_split: str = "validation"

    seed: int = 0
    """Seed for the eval hold-out (and, by convention, for the batch iterator's shuffle)."""

    synthetic: bool = False
    """Benchmarks: uniform random token ids of `seq_len` instead of rows (no files are read, no eval)."""

    num_proc: int | None = None
    """Worker processes for `datasets.map` tokenisation; None = in-process."""

    def validate(self) -> None:
        """Raise `ValueError` naming the offending field and how to fix it."""
        if self.synthetic:
            if not isinstance(self.seq_len, int) or self.seq_len < 2:
                raise ValueError(f"data.seq_len is {self.seq_len!r}: use an integer of at least 2")
            return
        if not self.train_path:
            raise ValueError("data.train_path is empty: set it to a .jsonl/.parquet/.arrow file, "
                             "a directory of them, or a datasets name")
        if self.format not in FORMATS:
            raise ValueError(f"data.format is {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row is {self.on_bad_row!r}: use one of {', '.join(BAD_ROW_POLICIES)}")
        for name in ("text_field", "prompt_field", "response_field", "messages_field", "train_split", "eval_split"):
            if not getattr(self, name):
                raise ValueError(f"data.{name} is empty: set it to the column name in your data")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"data.seq_len is {self.seq_len!r}: use an integer of at least 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction is {self.eval_fraction}: use a value in [0, 1)")
        if self.eval_path and self.eval_fraction > 0:
            raise ValueError("data.eval_fraction and data.eval_path are both set: use eval_path for a separate "
                             "eval set, or eval_fraction to carve one out of train, not both")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"data.num_proc is {self.num_proc}: use a positive integer or leave it unset")
