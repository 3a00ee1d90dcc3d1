"""Data problems are bad input: what miss_ds.data finds wrong with the files a run or a tool reads (bad rows, empty
or missing sources, a tokenizer unfit for the format) is raised as ``ConfigError``, which every command reports in
one line (exit code 2)."""
from __future__ import annotations

from typing import Callable, TypeVar

from ..config import ConfigError

T = TypeVar("T")


def read_data(read: Callable[[], T]) -> T:
    """``read()``, which reads data files; its ``ValueError`` / ``FileNotFoundError`` become ``ConfigError`` with
    the same message (miss_ds.data's messages name the file, line or key and what to do)."""
    try:
        return read()
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
