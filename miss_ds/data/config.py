"""`DataConfig`: everything the data pipeline needs to know, checked before any work starts."""

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

FORMATS = ("text", "instruction", "chat")
BAD_ROW_POLICIES = ("error", "skip")
FIELD_NAMES = ("text_field", "prompt_field", "response_field", "messages_field")
#: Data files read by suffix (anything else is a directory of them, a ``save_to_disk`` directory or a ``datasets``
#: name).
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
NAME = re.compile(r"[-\w.]+", re.ASCII)  # a source's name: a TensorBoard tag's characters


@dataclass
class SourceConfig:
    """One source of a data mix (`DataConfig.sources`): its rows, their format and its share of the training rows.

    Unset (None) format and column names are taken from the `data.` keys of the same name.
    """

    path: str = ""
    """Training rows: any source `data.train_path` accepts."""

    name: str | None = None
    """This source's name in the logs and metrics (its eval loss: `loss/<name>` of split `eval`): letters, digits,
    `-`, `_` and `.`, unique among the sources; None: `source<i>`, i its place in `sources` (from 0)."""

    weight: float = 1.0
    """This source's share of the mixed training rows, relative to the other sources' weights (positive)."""

    eval_path: str | None = None
    """This source's eval rows (optional); the eval set is the union of the sources' eval rows, and each source's
    eval loss is logged beside the overall one (`name`)."""

    format: Literal["text", "instruction", "chat"] | None = None
    """This source's row format; None: `data.format`."""

    # This source's column names; None: the `data.` ones.
    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None


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
    """Length in tokens of every sequence handed to the model, at least 2."""

    pack: bool = False
    """Place several whole examples in each `seq_len` sequence (best-fit-decreasing over windows of
    examples) instead of one padded example per sequence. Position ids restart at every example, which
    confines attention to it: packed training computes the loss and gradients of unpacked training.
    Either way an example longer than `seq_len` is a bad row."""

    on_bad_row: Literal["error", "skip"] = "error"
    """What to do with bad rows (malformed, longer than `seq_len`, a chat with a role or turn order the tokenizer's
    chat template refuses): "error": raise, quoting them by file and line; "skip": drop them and count them in the
    stats."""

    eval_fraction: float = 0.0
    """When `eval_path` is None, hold out this fraction of the train rows as eval, in [0, 1) (0 = none); with
    `sources`, this fraction of every source."""

    # Split names, used only for sources that hold several splits (`datasets` names,
    # `save_to_disk` directories of a `DatasetDict`).
    train_split: str = "train"
    eval_split: str = "validation"

    seed: int = 0
    """Seed for the eval hold-out, the mix and the batch iterator's shuffle, in [0, 2**32) (numpy's seeds)."""

    synthetic: bool = False
    """Benchmarks: uniform random token ids of `seq_len` instead of rows (no files are read, no eval)."""

    num_proc: int | None = None
    """Worker processes for `datasets.map` tokenisation, at least 1; None = in-process."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Several sources mixed in one run, each with its own path, format and weight; replaces
    `train_path`/`eval_path` (set one or the other). The training set is as large as all usable rows
    together and takes round(weight / sum of weights * that) rows of a source: whole passes over it,
    then a seeded sample without repeats (mixing.py)."""

    def per_source(self) -> list[tuple["DataConfig", float]]:
        """(single-source config, weight) of every source; without `sources` this config is the only one."""
        if not self.sources:
            return [(self, 1.0)]
        configs = []
        for source in self.sources:
            inherited = {name: getattr(source, name) or getattr(self, name) for name in ("format", *FIELD_NAMES)}
            configs.append((replace(self, train_path=source.path, eval_path=source.eval_path, sources=[],
                                    **inherited), source.weight))
        return configs

    def source_names(self) -> list[str]:
        """Every source's name (`SourceConfig.name`), in the order of `per_source`; the one source of a config
        without `sources` is `data`."""
        if not self.sources:
            return ["data"]
        return [source.name or f"source{index}" for index, source in enumerate(self.sources)]

    def validate(self) -> None:
        """Raise `ValueError` naming the offending field and how to fix it."""
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed is {self.seed!r}: use an integer in [0, 2**32)")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"data.seq_len is {self.seq_len!r}: use an integer of at least 2")
        if self.synthetic:
            return
        if self.sources:
            self._validate_sources()
        elif not self.train_path:
            raise ValueError("data.train_path is empty: set it to a .jsonl/.parquet/.arrow file, "
                             "a directory of them, or a datasets name (or list several under data.sources)")
        if self.format not in FORMATS:
            raise ValueError(f"data.format is {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"data.on_bad_row is {self.on_bad_row!r}: use one of {', '.join(BAD_ROW_POLICIES)}")
        for name in (*FIELD_NAMES, "train_split", "eval_split"):
            if not getattr(self, name):
                raise ValueError(f"data.{name} is empty: set it to the column name in your data")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction is {self.eval_fraction}: use a value in [0, 1)")
        if self.eval_path and self.eval_fraction > 0:
            raise ValueError("data.eval_fraction and data.eval_path are both set: use eval_path for a separate "
                             "eval set, or eval_fraction to carve one out of train, not both")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"data.num_proc is {self.num_proc}: use a positive integer or leave it unset")

    def _validate_sources(self) -> None:
        if self.train_path or self.eval_path:
            raise ValueError("data.sources and data.train_path/eval_path are both set: list every source (path, "
                             "eval_path) under data.sources, or use train_path/eval_path for a single source")
        names = self.source_names()
        for index, label in enumerate(names):
            if label in names[:index]:
                raise ValueError(f"data.sources[{names.index(label)}] and data.sources[{index}] are both named "
                                 f"{label!r}: give each source its own name")
        for index, source in enumerate(self.sources):
            name = f"data.sources[{index}]"
            if not source.path:
                raise ValueError(f"{name}.path is empty: set it to this source's training rows")
            if not (isinstance(source.weight, (int, float)) and math.isfinite(source.weight) and source.weight > 0):
                raise ValueError(f"{name}.weight is {source.weight!r}: use a positive number")
            if source.format is not None and source.format not in FORMATS:
                raise ValueError(f"{name}.format is {source.format!r}: use one of {', '.join(FORMATS)}")
            for key in FIELD_NAMES:
                if getattr(source, key) == "":
                    raise ValueError(f"{name}.{key} is empty: set it to the column name, or leave it unset "
                                     f"for data.{key}")
            if source.name is not None and not (isinstance(source.name, str) and NAME.fullmatch(source.name)):
                raise ValueError(f"{name}.name is {source.name!r}: use letters, digits, '-', '_' and '.' only")
            if source.eval_path and self.eval_fraction > 0:
                raise ValueError(f"{name}.eval_path and data.eval_fraction are both set: use eval_path for this "
                                 "source's eval rows, or eval_fraction to hold out a fraction of every source")
