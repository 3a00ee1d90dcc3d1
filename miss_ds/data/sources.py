"""Read raw rows from local files, `save_to_disk` directories or cached `datasets` names.

Every reader returns checked rows (see `rows.py`). JSON Lines files are read line
by line here rather than by `load_dataset("json")`, because a bad row must be
reported by file and line number, and an unparsable line must not abort the read
when bad rows are to be skipped. A `.json` file holds JSON Lines or one array of
rows (read by `load_dataset("json")`); a file that is neither (one JSON object, an
array in a `.jsonl` file, a compressed file) is refused once, by name, rather than
line by line.
"""

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow
from datasets import Dataset, DatasetDict, concatenate_datasets, config, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from datasets.naming import camelcase_to_snakecase

from miss_ds.data.config import FILE_SUFFIXES, DataConfig
from miss_ds.data.rows import checked_row, row_features

#: The `datasets` builder of each data file suffix but ".jsonl" (which is read line by line): its name.
ARROW_BUILDERS = {suffix: suffix[1:] for suffix in FILE_SUFFIXES if suffix != ".jsonl"}
SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
#: The magic bytes a compressed file starts with: its format, and the command that writes it out unpacked.
COMPRESSED = {b"\x1f\x8b": ("gzip", "gzip -dc"), b"\x28\xb5\x2f\xfd": ("zstd", "zstd -dc"),
              b"\xfd7zXZ\x00": ("xz", "xz -dc"), b"BZh": ("bzip2", "bzip2 -dc")}

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
    if path.suffix in (".jsonl", ".json") and _json_layout(path) == "lines":
        return _read_json_lines(path, cfg, role)
    if path.suffix not in ARROW_BUILDERS:
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    try:
        rows = load_dataset(ARROW_BUILDERS[path.suffix], data_files={role: str(path)}, split=role)
    except (pyarrow.ArrowException, DatasetGenerationError) as error:  # pyarrow's messages do not name the file
        cause = str(error.__cause__ or error).rstrip(".")
        raise ValueError(f"{path} cannot be read ({cause}): is it whole? Write it again") from None
    return _check(rows, str(path), cfg)


def _json_layout(path: Path) -> Literal["lines", "array"]:
    """How a .jsonl/.json file holds its rows: JSON Lines, or (.json only) one JSON array of them, which
    `load_dataset("json")` reads. A file that is compressed, empty, or one JSON document spread over lines (whose
    every line would be a bad row) is refused naming it; the first line decides, a UTF-8 BOM aside."""
    with open(path, "rb") as stream:
        head = stream.read(8)
    for magic, (name, unpack) in COMPRESSED.items():
        if head.startswith(magic):
            raise ValueError(f"{path} is {name}-compressed (it starts with {name}'s magic bytes), not JSON text: "
                             f"unpack it first ({unpack} {path} > rows{path.suffix})")
    number, first = _first_line(path)
    if not first:
        raise ValueError(f"{path} contains no rows")
    if path.suffix == ".json" and first.startswith(b"["):
        return "array"
    if first in (b"[", b"{"):
        what = "array" if first == b"[" else "object"
        raise ValueError(f"{path} is not JSON Lines (one object per line): it holds one JSON {what} spread over "
                         f"lines (line {number} is {first.decode()!r}). Write one row per line{_convert_hint(path)}")
    return "lines"


def _convert_hint(path: Path) -> str:
    """How to turn the one JSON document in `path` (an array in a .jsonl file, or an object) into JSON Lines, for
    jq: where its rows are."""
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return ""
    if isinstance(document, list):
        return f": jq -c '.[]' {path} > rows.jsonl (or name it .json: a .json file may hold one array of rows)"
    lists = [key for key, value in document.items() if isinstance(value, list)] if isinstance(document, dict) else []
    if not lists:
        return ""
    step = f".{lists[0]}" if lists[0].isidentifier() else f".[{json.dumps(lists[0])}]"
    return f": its rows look to be under {lists[0]!r}, so jq -c '{step}[]' {path} > rows.jsonl"


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


def _first_line(path: Path) -> tuple[int, bytes]:
    """The number and stripped text of the first non-blank line of `path` (a UTF-8 BOM dropped), or (0, b"") for a
    blank file."""
    with open(path, "rb") as stream:
        for number, line in enumerate(stream, start=1):
            text = line.removeprefix(codecs.BOM_UTF8).strip() if number == 1 else line.strip()
            if text:
                return number, text
    return 0, b""
