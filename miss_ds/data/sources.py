"""Read raw rows from local files, `save_to_disk` directories or cached `datasets` names.

Every reader returns checked rows (see `rows.py`). JSON Lines files are read line
by line here rather than by `load_dataset("json")`, because a bad row must be
reported by file and line number, and an unparsable line must not abort the read
when bad rows are to be skipped.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, DatasetDict, concatenate_datasets, config, load_dataset, load_from_disk
from datasets.fingerprint import Hasher
from datasets.naming import camelcase_to_snakecase

from miss_ds.data.config import FILE_SUFFIXES, DataConfig
from miss_ds.data.rows import checked_row, row_features

#: The `datasets` builder of each data file suffix but ".jsonl" (which is read line by line): its name.
ARROW_BUILDERS = {suffix: suffix[1:] for suffix in FILE_SUFFIXES if suffix != ".jsonl"}
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")

Role = Literal["train", "eval"]


def read_rows(path: str, cfg: DataConfig, role: Role, key: str) -> Dataset:
    """Checked rows from `path`: a data file, a directory of them, a `save_to_disk`
    directory, or a `datasets` name (offline: it must already be cached).

    `role` picks the split of a source that holds several (`cfg.train_split` or
    `cfg.eval_split`) and names what is read in progress bars; `key` is the setting
    that named `path` (e.g. "data.train_path"), for the error when it is nowhere.
    """
    local = Path(path)
    split = cfg.eval_split if role == "eval" else cfg.train_split
    if local.is_file():
        parts = [_read_file(local, cfg, role)]
    elif local.is_dir() and any((local / marker).exists() for marker in SAVED_DATASET_MARKERS):
        parts = [_check(_pick_split(load_from_disk(path), split, path), path, cfg)]
    elif local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} is a directory with no {'/'.join(FILE_SUFFIXES)} files")
        parts = [_read_file(file, cfg, role) for file in files]
    elif local.suffix in FILE_SUFFIXES:
        raise FileNotFoundError(f"{key} = {path} does not exist (relative paths start at {Path.cwd()})")
    elif not _in_datasets_cache(path):
        raise FileNotFoundError(f"{key} = {path} does not exist here (relative paths start at {Path.cwd()}) and is "
                                f"no dataset in the datasets cache ({config.HF_DATASETS_CACHE}): point it at local "
                                "data, or load the dataset once with datasets.load_dataset where the Hugging Face Hub "
                                "can be reached")
    else:
        parts = [_check(load_dataset(path, split=split), path, cfg)]
    rows = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(rows) == 0:
        raise ValueError(f"{path} contains no rows")
    return rows


def _in_datasets_cache(name: str) -> bool:
    """Whether the `datasets` cache holds a prepared copy of the Hub dataset `name` ("name" or "owner/name"), the
    one place `load_dataset` finds it without the Hub (as `datasets.load.CachedDatasetModuleFactory` looks)."""
    parts = name.split("/")
    if name.startswith((".", "~")) or os.path.isabs(name) or len(parts) > 2 or not all(parts):
        return False
    folder = Path(config.HF_DATASETS_CACHE) / "___".join([*parts[:-1], camelcase_to_snakecase(parts[-1])])
    return any(prepared.is_dir() for prepared in folder.glob("*/*/*"))


def _read_file(path: Path, cfg: DataConfig, role: Role) -> Dataset:
    if path.suffix in (".jsonl", ".json"):
        first = _first_char(path)
        if not first:
            raise ValueError(f"{path} contains no rows")
        if path.suffix == ".jsonl" or first != b"[":  # a .json file may hold one JSON array instead of lines
            return _read_json_lines(path, cfg, role)
    if path.suffix not in ARROW_BUILDERS:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    rows = load_dataset(ARROW_BUILDERS[path.suffix], data_files={role: str(path)}, split=role)
    return _check(rows, str(path), cfg)


def _read_json_lines(path: Path, cfg: DataConfig, role: Role) -> Dataset:
    """Checked rows of a JSON Lines file, cached by the file's size and modification time."""
    stat = path.stat()
    fingerprint = Hasher.hash([str(path.resolve()), stat.st_size, stat.st_mtime_ns, cfg, role, _json_lines])
    return Dataset.from_generator(
        _json_lines,
        gen_kwargs={"path": str(path), "cfg": cfg},
        features=row_features(cfg),
        split=role,
        fingerprint=fingerprint,
    )


def _json_lines(path: str, cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """One checked row per non-blank line; an unparsable line becomes a bad row."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            origin = f"{path} line {number}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as error:
                yield checked_row(None, origin, cfg, problem=f"not valid JSON: {error.msg} at column {error.colno}")
            except UnicodeDecodeError:
                yield checked_row(None, origin, cfg, problem="not valid UTF-8 text")
            else:
                yield checked_row(row, origin, cfg)


def _check(dataset: Dataset, name: str, cfg: DataConfig) -> Dataset:
    """Checked rows of an Arrow-backed dataset; origins are "<name> row <0-based index>"."""
    return dataset.map(
        lambda row, index: checked_row(row, f"{name} row {index}", cfg),
        with_indices=True,
        remove_columns=dataset.column_names,
        features=row_features(cfg),
        num_proc=cfg.num_proc,
        desc=f"checking {os.path.basename(name)}",
    )


def _pick_split(loaded: Dataset | DatasetDict, split: str, path: str) -> Dataset:
    if isinstance(loaded, Dataset):
        return loaded
    if split not in loaded:
        raise ValueError(f"{path} has splits {sorted(loaded)}, not {split!r}: set data.train_split/eval_split")
    return loaded[split]


def _first_char(path: Path) -> bytes:
    """The first non-whitespace byte of `path`, or b"" for a blank file."""
    with open(path, "rb") as stream:
        for line in stream:
            if line.strip():
                return line.lstrip()[:1]
    return b""
