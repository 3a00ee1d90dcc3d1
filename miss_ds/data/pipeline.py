"""`build_datasets`: config + tokenizer -> fixed-length train/eval sets, and what was used or dropped."""

import logging
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value
from transformers import PreTrainedTokenizerBase

from miss_ds.data.config import DataConfig
from miss_ds.data.encode import IGNORE_INDEX, check_tokenizer, encode_batch
from miss_ds.data.rows import ORIGIN, PROBLEM, BadRow, bad_rows_message, split_off_bad_rows
from miss_ds.data.sequences import pack_batch, pad_batch
from miss_ds.data.sources import read_rows

logger = logging.getLogger(__name__)

SEQUENCE_FEATURES = Features({name: List(Value("int32")) for name in ("input_ids", "labels", "attention_mask")})
PACK_GROUP_ROWS = 1000  # examples packed together; each group pads only its last block


@dataclass
class SplitStats:
    """What one split (train or eval) turned into."""

    rows: int  # rows that became training text
    bad_rows: int  # malformed rows skipped (on_bad_row="skip")
    too_long_rows: int  # rows longer than seq_len skipped (on_bad_row="skip", no packing)
    sequences: int  # seq_len-long sequences built
    tokens: int  # non-padding tokens
    loss_tokens: int  # label positions that are not IGNORE_INDEX


@dataclass
class DataStats:
    """Stats of both splits; `eval` is None when there is no eval set."""

    train: SplitStats
    eval: SplitStats | None


def build_datasets(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None, DataStats]:
    """Read, check, tokenise and pad/pack the train (and eval) data described by `cfg`.

    Returns datasets of `input_ids`, `labels`, `attention_mask` rows, each exactly
    `cfg.seq_len` long, ready for `BatchIterator`; the eval set is None when
    `cfg` asks for none. Raises `ValueError` on bad config, an unsuitable
    tokenizer, bad rows (unless skipped) or an empty result.
    """
    cfg.validate()
    check_tokenizer(tokenizer, cfg)
    train_rows, train_bad = _usable_rows(cfg.train_path, cfg.train_split, cfg)
    eval_rows, eval_bad = _usable_rows(cfg.eval_path, cfg.eval_split, cfg) if cfg.eval_path else (None, [])
    if cfg.eval_fraction > 0:
        held_out = train_rows.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        train_rows, eval_rows = held_out["train"], held_out["test"]
    train, train_stats = _sequences(train_rows, len(train_bad), tokenizer, cfg, "train")
    logger.info("train data: %s", train_stats)
    if eval_rows is None:
        return train, None, DataStats(train_stats, None)
    evaluation, eval_stats = _sequences(eval_rows, len(eval_bad), tokenizer, cfg, "eval")
    logger.info("eval data: %s", eval_stats)
    return train, evaluation, DataStats(train_stats, eval_stats)


def _usable_rows(path: str, split: str, cfg: DataConfig) -> tuple[Dataset, list[BadRow]]:
    rows, bad = split_off_bad_rows(read_rows(path, split, cfg), cfg)
    if bad:
        logger.warning("skipped bad rows of %s: %s", path, bad_rows_message(bad))
    if len(rows) == 0:
        raise ValueError(f"all {len(bad)} rows of {path} are bad; nothing left to train on")
    return rows, bad


def _sequences(
    rows: Dataset, bad_rows: int, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, name: str
) -> tuple[Dataset, SplitStats]:
    """Encode rows, reject or drop over-long ones (when padding), then pad or pack to `seq_len`."""
    encoded = rows.map(
        partial(encode_batch, tokenizer=tokenizer, cfg=cfg),
        batched=True,
        remove_columns=[column for column in rows.column_names if column != ORIGIN],
        num_proc=cfg.num_proc,
        desc=f"tokenising {name}",
    )
    too_long: list[BadRow] = []
    if not cfg.pack:
        encoded = encoded.map(
            lambda lengths: {PROBLEM: [_length_problem(length, cfg.seq_len) for length in lengths]},
            input_columns="length",
            batched=True,
        )
        encoded, too_long = split_off_bad_rows(encoded, cfg, fix="Raise data.seq_len, set data.pack: true")
        if too_long:
            logger.warning("skipped over-long %s rows: %s", name, bad_rows_message(too_long))
        if len(encoded) == 0:
            raise ValueError(f"no {name} row fits in data.seq_len={cfg.seq_len}")
    to_sequences = pack_batch if cfg.pack else pad_batch
    sequences = encoded.map(
        partial(to_sequences, seq_len=cfg.seq_len, pad_id=tokenizer.pad_token_id),
        batched=True,
        batch_size=PACK_GROUP_ROWS,
        remove_columns=encoded.column_names,
        features=SEQUENCE_FEATURES,
        num_proc=cfg.num_proc,
        desc=f"{'packing' if cfg.pack else 'padding'} {name}",
    )
    columns = sequences.with_format("arrow")
    labels = pc.list_flatten(columns["labels"])
    stats = SplitStats(
        rows=len(encoded),
        bad_rows=bad_rows,
        too_long_rows=len(too_long),
        sequences=len(sequences),
        tokens=pc.sum(pc.list_flatten(columns["attention_mask"])).as_py(),
        loss_tokens=pc.sum(pc.cast(pc.not_equal(labels, IGNORE_INDEX), pa.int64())).as_py(),
    )
    return sequences, stats


def _length_problem(length: int, seq_len: int) -> str:
    return f"{length} tokens, more than data.seq_len={seq_len}" if length > seq_len else ""
