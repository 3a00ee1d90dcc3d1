"""Per-row checks shared by every source: what a usable row looks like for each format.

A checked row keeps only the fields its format needs, plus where it came from
(`ORIGIN`, e.g. "train.jsonl line 7") and what is wrong with it (`PROBLEM`, ""
when nothing is), so later stages can report or drop bad rows by name.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, Features, List, Value

from miss_ds.data.config import DataConfig

ORIGIN = "_origin"
PROBLEM = "_problem"
MAX_REPORTED = 5  # bad rows quoted in one error message


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be used: where it is (file and line, or source and 0-based row) and why."""

    origin: str
    problem: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.problem}"


def row_features(cfg: DataConfig) -> Features:
    """Arrow schema of checked rows for `cfg.format`."""
    if cfg.format == "chat":
        fields = {cfg.messages_field: List({"role": Value("string"), "content": Value("string")})}
    elif cfg.format == "instruction":
        fields = {cfg.prompt_field: Value("string"), cfg.response_field: Value("string")}
    else:
        fields = {cfg.text_field: Value("string")}
    return Features({**fields, ORIGIN: Value("string"), PROBLEM: Value("string")})


def row_problem(row: Any, cfg: DataConfig) -> str | None:
    """Why `row` is unusable for `cfg.format`, or None when it is fine."""
    if not isinstance(row, Mapping):
        return f"expected an object with fields, got {type(row).__name__}"
    if cfg.format == "chat":
        if cfg.messages_field not in row:
            return f"missing field {cfg.messages_field!r}"
        return _messages_problem(row[cfg.messages_field], cfg.messages_field)
    if cfg.format == "instruction":
        return _string_problem(row, cfg.prompt_field, allow_empty=True) or _string_problem(row, cfg.response_field)
    return _string_problem(row, cfg.text_field)


def checked_row(row: Any, origin: str, cfg: DataConfig, problem: str | None = None) -> dict[str, Any]:
    """`row` reduced to the fields of `cfg.format`, tagged with its origin and problem.

    A bad row keeps empty placeholder values so it still fits `row_features(cfg)`.
    """
    problem = problem or row_problem(row, cfg)
    if cfg.format == "chat":
        messages = [] if problem else [{"role": m["role"], "content": m["content"]} for m in row[cfg.messages_field]]
        fields: dict[str, Any] = {cfg.messages_field: messages}
    elif cfg.format == "instruction":
        fields = {name: "" if problem else row[name] for name in (cfg.prompt_field, cfg.response_field)}
    else:
        fields = {cfg.text_field: "" if problem else row[cfg.text_field]}
    return {**fields, ORIGIN: origin, PROBLEM: problem or ""}


def split_off_bad_rows(rows: Dataset, cfg: DataConfig, fix: str = "Fix these rows") -> tuple[Dataset, list[BadRow]]:
    """Rows whose `PROBLEM` is empty, and the bad ones.

    With `on_bad_row="error"` bad rows raise `ValueError` instead; `fix` starts its advice.
    """
    columns = rows.with_format("arrow")
    problems = columns[PROBLEM].to_pylist()
    bad_indices = [i for i, problem in enumerate(problems) if problem]
    if not bad_indices:
        return rows, []
    origins = columns[ORIGIN]
    bad = [BadRow(origins[i].as_py(), problems[i]) for i in bad_indices]
    if cfg.on_bad_row == "error":
        raise ValueError(f'{bad_rows_message(bad)}\n{fix}, or set data.on_bad_row: "skip" to drop them.')
    return rows.filter(lambda problem: not problem, input_columns=PROBLEM), bad


def bad_rows_message(bad: list[BadRow]) -> str:
    """One readable message quoting the first few bad rows."""
    lines = [f"{len(bad)} bad row(s):"] + [f"  {row}" for row in bad[:MAX_REPORTED]]
    if len(bad) > MAX_REPORTED:
        lines.append(f"  ... and {len(bad) - MAX_REPORTED} more")
    return "\n".join(lines)


def _string_problem(row: Mapping, field: str, allow_empty: bool = False) -> str | None:
    if field not in row:
        return f"missing field {field!r}"
    value = row[field]
    if value is None:
        return f"field {field!r} is null"
    if not isinstance(value, str):
        return f"field {field!r} should be a string, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return f"field {field!r} is empty"
    return None


def _messages_problem(messages: Any, field: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"field {field!r} should be a non-empty list of messages"
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"{field}[{number}] should be an object with 'role' and 'content'"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"{field}[{number}] needs a string {key!r}"
    if not any(message["role"] == "assistant" for message in messages):
        return f"field {field!r} has no assistant message, so nothing to learn from"
    return None
