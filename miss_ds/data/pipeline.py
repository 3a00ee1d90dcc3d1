"""`build_datasets`: config + tokenizer -> fixed-length train/eval sets, and what was used or dropped;
`build_eval_splits`: the eval sets of a trained model (miss-ds-eval): a file, or those its training evaluated."""

import logging
import math
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from miss_ds.data.config import DataConfig
from miss_ds.data.encode import IGNORE_INDEX, check_tokenizer, encode_batch
from miss_ds.data.mixing import mix
from miss_ds.data.rows import (ORIGIN, PROBLEM, Advice, BadRow, bad_rows_message, split_off_bad_rows,
                               with_template_problems)
from miss_ds.data.sequences import pack_batch, pad_batch
from miss_ds.data.sources import Role, read_rows

logger = logging.getLogger(__name__)


def _features(*names: str) -> Features:
    return Features({name: List(Value("int32")) for name in names})


PADDED_FEATURES = _features("input_ids", "labels", "attention_mask")
PACKED_FEATURES = _features("input_ids", "labels", "position_ids")
PAD_BATCH_ROWS = 1000  # examples per `datasets.map` batch when padding
# Examples packed together: at least this many, and enough for this many full sequences (only a window's last
# sequences are left part empty, so a larger window pads less).
PACK_WINDOW_ROWS = 1000
PACK_WINDOW_SEQUENCES = 64
PACK_STREAM = 2  # random stream of the shuffle before packing (see mixing.MIX_STREAM)
#: The eval set's column naming each sequence's source (an index into `DataStats.eval_sets`); not a model input.
EVAL_SET = "eval_set"


@dataclass
class SplitStats:
    """What one split (train or eval) turned into."""

    rows: int  # examples in the split's sequences (for a training mix: the rows taken, repeats included)
    bad_rows: int  # malformed rows skipped (on_bad_row="skip")
    too_long_rows: int  # rows longer than seq_len skipped (on_bad_row="skip")
    sequences: int  # seq_len-long sequences built
    tokens: int  # non-padding tokens
    loss_tokens: int  # label positions that are not IGNORE_INDEX
    padding_fraction: float  # share of the sequences' seq_len slots that hold padding


@dataclass
class SourceStats:
    """One source of the training set and how many of its rows the mix took."""

    path: str
    format: str
    weight: float
    rows: int  # usable training rows of the source
    taken: int  # rows of it in the training set: more than `rows` when the mix repeats it


@dataclass
class DataStats:
    """Stats of both splits (`eval` is None when there is no eval set) and of every training source."""

    train: SplitStats
    eval: SplitStats | None
    sources: list[SourceStats]
    eval_sets: list[str] = field(default_factory=list)
    """The names (`DataConfig.source_names`) of the sources with eval rows: eval sequence `i` is of
    `eval_sets[eval_set[i]]` (its `EVAL_SET` column)."""


@dataclass
class EvalSplit:
    """One eval set of a trained model: a file, or a source's eval_fraction hold-out."""

    name: str
    """What was read: the file, or which hold-out (`_eval_name`)."""
    source: str
    """The source's name (`DataConfig.source_names`), as training logs its eval loss."""
    cfg: DataConfig
    """The config of its source: the format and column names of `rows`."""
    rows: Dataset
    """The checked rows in `sequences`, in order: what the answers are asked of, so that the loss and the answers
    are of the same rows."""
    sequences: Dataset
    stats: SplitStats


@dataclass
class _Examples:
    """Encoded examples that fit `seq_len`, and how many rows were dropped on the way."""

    examples: Dataset
    bad_rows: int
    too_long_rows: int


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None, DataStats]:
    """Read, check, tokenise, mix and pad/pack the train (and eval) data described by `cfg`.

    Returns datasets of sequences, each exactly `cfg.seq_len` long (`input_ids`, `labels` and
    `attention_mask` when padded, `position_ids` instead of `attention_mask` when packed), ready for
    `BatchIterator`; the eval set is None when `cfg` asks for none. Raises `ValueError` on bad config,
    an unsuitable tokenizer, bad rows (unless skipped) or an empty result.
    """
    cfg.validate()
    sources = cfg.per_source()
    encoded = [_source_examples(source, tokenizer, _keys(cfg, index)) for index, (source, _) in enumerate(sources)]
    weights = [weight for _, weight in sources]
    trains = [train for train, _ in encoded]
    mixed, taken = mix([train.examples for train in trains], weights, cfg.seed)
    source_stats = [SourceStats(source.train_path, source.format, weight, len(train.examples), count)
                    for (source, weight), train, count in zip(sources, trains, taken, strict=True)]
    logger.info("train rows per source: %s", "; ".join(
        f"{s.path} ({s.format}, weight {s.weight:g}): {s.taken} of {s.rows}" for s in source_stats))
    train, train_stats = _sequences(_joined(trains, mixed), tokenizer, cfg, "train")
    logger.info("train data: %s", train_stats)
    names = cfg.source_names()
    evals = [(name, evaluation) for name, (_, evaluation) in zip(names, encoded, strict=True)
             if evaluation is not None]
    if not evals:
        return train, None, DataStats(train_stats, None, source_stats)
    # Each source's eval rows become sequences of their own, so that the eval loss can be told per source.
    built = [_sequences(examples, tokenizer, cfg, f"eval ({name})") for name, examples in evals]
    evaluation = concatenate_datasets([sequences.add_column(EVAL_SET, [index] * len(sequences))
                                       for index, (sequences, _) in enumerate(built)])
    eval_stats = _summed([stats for _, stats in built], cfg.seq_len)
    logger.info("eval data: %s", eval_stats)
    return train, evaluation, DataStats(train_stats, eval_stats, source_stats, [name for name, _ in evals])


def build_eval_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, advice: Advice, limit: int | None = None,
                      path: str | None = None, key: str = "") -> list[EvalSplit]:
    """The eval sets of a model trained on `cfg`, each built as training builds its eval set: `path` (named by the
    setting `key`) in `cfg`'s format, else every source's eval set that training evaluated, in its own format (its
    `eval_path`, or its `eval_fraction` hold-out, split off its usable train rows exactly as training split it);
    none when training evaluated none.

    Each set keeps its first `limit` (all: None) usable rows that fit `seq_len`; `advice` says in the caller's terms
    how to deal with bad rows.
    """
    if path is not None:
        check_tokenizer(tokenizer, cfg)
        rows, bad = usable_rows(path, cfg, "eval", key, tokenizer.chat_template, advice)
        return [_eval_split(path, "data", cfg, rows, len(bad), tokenizer, advice, limit)]
    splits = []
    for index, ((source, _), name) in enumerate(zip(cfg.per_source(), cfg.source_names(), strict=True)):
        train_key, eval_key = _keys(cfg, index)
        if not (source.eval_path or source.eval_fraction > 0):
            continue
        check_tokenizer(tokenizer, source)
        if source.eval_path:
            rows, bad = usable_rows(source.eval_path, source, "eval", eval_key, tokenizer.chat_template, advice)
        else:  # the rows of the hold-out were checked as train rows: their bad rows are not the hold-out's
            train_rows, _ = usable_rows(source.train_path, source, "train", train_key, tokenizer.chat_template, advice)
            rows, bad = _hold_out(train_rows, source)[1], []
        splits.append(_eval_split(_eval_name(source), name, source, rows, len(bad), tokenizer, advice, limit))
    return splits


def split_eval_sets(sequences: Dataset | None, names: list[str], cap: int) -> list[tuple[str, Dataset]]:
    """The eval sequences of `build_datasets` split by source (`EVAL_SET` indexes `names`, its
    `DataStats.eval_sets`), each cut to its first `cap` sequences (0: all): the same sequences on any layout."""
    if sequences is None:
        return []
    source = np.asarray(sequences[EVAL_SET])
    sets = []
    for index, name in enumerate(names):
        rows = np.flatnonzero(source == index)
        sets.append((name, sequences.select(rows[:cap] if cap else rows)))
    return sets


def usable_rows(path: str, cfg: DataConfig, role: Role, key: str, template: str | dict[str, str] | None,
                advice: Advice = Advice()) -> tuple[Dataset, list[BadRow]]:
    """The good rows of `path` and its bad ones (`cfg.on_bad_row="error"`: a `ValueError` quoting them).

    Chat rows are checked against `template`, the tokenizer's chat template (`rows.with_template_problems`: roles it
    does not know, conversations it refuses); None leaves them unchecked (rows already checked when they were
    trained on).
    """
    rows = read_rows(path, cfg, role, key)
    if template is not None:
        rows = with_template_problems(rows, cfg, template)
    rows, bad = split_off_bad_rows(rows, cfg, advice)
    if bad:
        logger.warning("skipped bad rows of %s: %s", path, bad_rows_message(bad))
    if len(rows) == 0:
        raise ValueError(f"all {len(bad)} rows of {path} are bad; nothing is left to use")
    return rows, bad


def _keys(cfg: DataConfig, index: int) -> tuple[str, str]:
    """The settings that name source `index`'s train and eval paths, for messages."""
    if cfg.sources:
        return f"data.sources[{index}].path", f"data.sources[{index}].eval_path"
    return "data.train_path", "data.eval_path"


def _joined(parts: list[_Examples], examples: Dataset) -> _Examples:
    """`examples` drawn from `parts`, with the rows the parts dropped."""
    return _Examples(examples, sum(p.bad_rows for p in parts), sum(p.too_long_rows for p in parts))


def _source_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, keys: tuple[str, str]
                     ) -> tuple[_Examples, _Examples | None]:
    """One source's train and eval examples (eval None without `eval_path` or `eval_fraction`); `keys` name its
    train and eval paths."""
    check_tokenizer(tokenizer, cfg)
    template = tokenizer.chat_template
    train_rows, train_bad = usable_rows(cfg.train_path, cfg, "train", keys[0], template)
    eval_rows, eval_bad = usable_rows(cfg.eval_path, cfg, "eval", keys[1], template) if cfg.eval_path else (None, [])
    if cfg.eval_fraction > 0:
        train_rows, eval_rows = _hold_out(train_rows, cfg)
    train = _fitting_examples(train_rows, len(train_bad), tokenizer, cfg, f"train rows of {cfg.train_path}")
    if eval_rows is None:
        return train, None
    return train, _fitting_examples(eval_rows, len(eval_bad), tokenizer, cfg, f"eval rows of {_eval_name(cfg)}")


def _hold_out(train_rows: Dataset, cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The usable train rows of a source split into (train, eval) by `cfg.eval_fraction`, seeded by `cfg.seed`: the
    same split whenever the same rows are read."""
    held_out = train_rows.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
    return held_out["train"], held_out["test"]


def _eval_name(cfg: DataConfig) -> str:
    """What a source's eval rows are read from, for messages and reports."""
    return cfg.eval_path or f"the eval_fraction hold-out of {cfg.train_path}"


def _eval_split(name: str, source: str, cfg: DataConfig, rows: Dataset, bad_rows: int,
                tokenizer: PreTrainedTokenizerBase, advice: Advice, limit: int | None) -> EvalSplit:
    """The first `limit` (all: None) of `rows` that fit `seq_len`, as sequences and as rows (selected by their
    origins, which name one row each)."""
    examples = _fitting_examples(rows, bad_rows, tokenizer, cfg, f"eval rows of {name}", advice)
    if limit is not None and limit < len(examples.examples):
        examples = replace(examples, examples=examples.examples.select(range(limit)))
    used = set(examples.examples[ORIGIN])
    rows = rows.filter(lambda origin: origin in used, input_columns=ORIGIN, desc=f"selecting the eval rows of {name}")
    sequences, stats = _sequences(examples, tokenizer, cfg, "eval")
    return EvalSplit(name, source, cfg, rows, sequences, stats)


def _fitting_examples(rows: Dataset, bad_rows: int, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, name: str,
                      advice: Advice = Advice()) -> _Examples:
    """Encode rows, then reject or drop (per `cfg.on_bad_row`) those longer than `seq_len`."""
    encoded = rows.map(
        partial(encode_batch, tokenizer=tokenizer, cfg=cfg),
        batched=True,
        remove_columns=[column for column in rows.column_names if column != ORIGIN],
        num_proc=cfg.num_proc,
        desc=f"tokenising {name}",
    )
    encoded = encoded.map(
        lambda lengths: {PROBLEM: [_length_problem(length, cfg.seq_len) for length in lengths]},
        input_columns="length",
        batched=True,
    )
    encoded, too_long = split_off_bad_rows(encoded, cfg, advice, fix=advice.fit)
    if too_long:
        logger.warning("skipped over-long %s: %s", name, bad_rows_message(too_long))
    if len(encoded) == 0:
        raise ValueError(f"none of the {name} fits in data.seq_len={cfg.seq_len}")
    return _Examples(encoded, bad_rows, len(too_long))


def _sequences(examples: _Examples, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, name: str
               ) -> tuple[Dataset, SplitStats]:
    """Pad or pack the examples to `seq_len`.

    Packing first shuffles the examples (seeded), so that windows mix sources and lengths; it runs in one
    process, so the windows, and with them the sequences, do not depend on `num_proc`.
    """
    encoded = examples.examples
    columns = encoded.with_format("arrow")
    tokens = pc.sum(columns["length"]).as_py()
    if cfg.pack:
        window = max(PACK_WINDOW_ROWS, math.ceil(PACK_WINDOW_SEQUENCES * cfg.seq_len * len(encoded) / tokens))
        order = np.random.default_rng([cfg.seed, PACK_STREAM]).permutation(len(encoded))
        to_sequences, features, batch_size, num_proc = pack_batch, PACKED_FEATURES, window, None
        source = encoded.select(order)
    else:
        to_sequences, features, batch_size, num_proc = pad_batch, PADDED_FEATURES, PAD_BATCH_ROWS, cfg.num_proc
        source = encoded
    sequences = source.map(
        partial(to_sequences, seq_len=cfg.seq_len, pad_id=tokenizer.pad_token_id),
        batched=True,
        batch_size=batch_size,
        remove_columns=source.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"{'packing' if cfg.pack else 'padding'} {name}",
    )
    labels = pc.list_flatten(columns["labels"])
    stats = SplitStats(
        rows=len(encoded),
        bad_rows=examples.bad_rows,
        too_long_rows=examples.too_long_rows,
        sequences=len(sequences),
        tokens=tokens,
        loss_tokens=pc.sum(pc.cast(pc.not_equal(labels, IGNORE_INDEX), pa.int64())).as_py(),
        padding_fraction=round(1 - tokens / (len(sequences) * cfg.seq_len), 4),
    )
    return sequences, stats


def _summed(parts: list[SplitStats], seq_len: int) -> SplitStats:
    """The stats of several sets of sequences taken as one."""
    total = {name: sum(getattr(part, name) for part in parts)
             for name in ("rows", "bad_rows", "too_long_rows", "sequences", "tokens", "loss_tokens")}
    return SplitStats(**total, padding_fraction=round(1 - total["tokens"] / (total["sequences"] * seq_len), 4))


def _length_problem(length: int, seq_len: int) -> str:
    return f"{length} tokens, more than data.seq_len={seq_len}" if length > seq_len else ""
