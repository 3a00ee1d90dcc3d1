"""Per-row checks shared by every source: what a usable row looks like for each format.

A checked row keeps only the fields its format needs, plus where it came from
(`ORIGIN`, e.g. "train.jsonl line 7") and what is wrong with it (`PROBLEM`, ""
when nothing is), so later stages can report or drop bad rows by name.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from datasets import Dataset, Features, List, Value

from miss_ds.data.config import FORMATS, DataConfig
from miss_ds.data.encode import template_refusal

ORIGIN = "_origin"
PROBLEM = "_problem"
MAX_REPORTED = 5  # bad rows quoted in one error message
# Chat roles every conversation may use; a template adds those it tests a message's role against.
STANDARD_ROLES = ("system", "user", "assistant")
# `message['role'] == 'tool'`, `message.role != "ipython"`, `message['role'] in ['tool', 'ipython']`
_ROLE_TEST = re.compile(r"""role['"]?\]?\s*(?:[!=]=\s*(['"][^'"]+['"])|(?:not\s+)?in\s*[\[(]([^\])]*)[\])])""")
_QUOTED = re.compile(r"""['"]([^'"]+)['"]""")


class Advice(NamedTuple):
    """What a reader of bad rows is told to do, in the terms of the command that read them."""

    skip: str = 'set data.on_bad_row: "skip"'
    """How to drop bad rows instead of stopping."""
    fit: str = "Raise data.seq_len or shorten these rows"
    """How to make rows longer than `seq_len` fit."""


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
    missing = _missing_problem(row, cfg)
    if missing:
        return missing
    if cfg.format == "chat":
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


def with_template_problems(rows: Dataset, cfg: DataConfig, template: str | dict[str, str] | None) -> Dataset:
    """Checked chat rows with the conversations `template` cannot train on marked bad too: a message whose role it
    does not know (`template_roles`), or a conversation it refuses to render (`encode.template_refusal`).

    A template renders an unknown role however it happens to (under its own name, as nothing, or with an error),
    so such a turn would train the model on a conversation it is never shown; a refused one cannot be encoded.
    """
    if cfg.format != "chat":
        return rows
    check = partial(_template_problems, field=cfg.messages_field, roles=template_roles(template), template=template)
    return rows.map(check, batched=True, input_columns=[cfg.messages_field, PROBLEM], num_proc=cfg.num_proc,
                    desc="checking the conversations against the chat template")


def template_roles(template: str | dict[str, str] | None) -> tuple[str, ...]:
    """The chat roles a row may use: `STANDARD_ROLES` and every role `template` (or its named templates) tests for."""
    sources = template.values() if isinstance(template, dict) else [template or ""]
    named = {role for source in sources for test in _ROLE_TEST.finditer(source)
             for role in _QUOTED.findall(test.group(1) or test.group(2))}
    return tuple(sorted(named | set(STANDARD_ROLES)))


def split_off_bad_rows(rows: Dataset, cfg: DataConfig, advice: Advice = Advice(), fix: str = "Fix these rows"
                       ) -> tuple[Dataset, list[BadRow]]:
    """Rows whose `PROBLEM` is empty, and the bad ones.

    With `on_bad_row="error"` bad rows raise `ValueError` instead; `fix` starts its advice, `advice.skip` ends it.
    """
    columns = rows.with_format("arrow")
    problems = columns[PROBLEM].to_pylist()
    bad_indices = [i for i, problem in enumerate(problems) if problem]
    if not bad_indices:
        return rows, []
    origins = columns[ORIGIN]
    bad = [BadRow(origins[i].as_py(), problems[i]) for i in bad_indices]
    if cfg.on_bad_row == "error":
        raise ValueError(f"{bad_rows_message(bad)}\n{fix}, or {advice.skip} to drop them.")
    return rows.filter(lambda problem: not problem, input_columns=PROBLEM), bad


def bad_rows_message(bad: list[BadRow]) -> str:
    """One readable message quoting the first few bad rows."""
    lines = [f"{len(bad)} bad row(s):"] + [f"  {row}" for row in bad[:MAX_REPORTED]]
    if len(bad) > MAX_REPORTED:
        lines.append(f"  ... and {len(bad) - MAX_REPORTED} more")
    return "\n".join(lines)


def _format_fields(fmt: str, cfg: DataConfig) -> tuple[str, ...]:
    """The fields a row of format `fmt` needs, under `cfg`'s names."""
    if fmt == "chat":
        return (cfg.messages_field,)
    if fmt == "instruction":
        return (cfg.prompt_field, cfg.response_field)
    return (cfg.text_field,)


def _missing_problem(row: Mapping, cfg: DataConfig) -> str | None:
    """The first field of `cfg.format` that `row` lacks, and which format the row's fields are of, if another's."""
    missing = [name for name in _format_fields(cfg.format, cfg) if name not in row]
    if not missing:
        return None
    others = [fmt for fmt in FORMATS if fmt != cfg.format and all(name in row for name in _format_fields(fmt, cfg))]
    if not others:
        return f"missing field {missing[0]!r}"
    fields = ", ".join(repr(name) for name in _format_fields(others[0], cfg))
    return (f"missing field {missing[0]!r}: the row has {fields}, as {others[0]!r} rows do, but rows are read as "
            f"data.format {cfg.format!r}")


def _string_problem(row: Mapping, field: str, allow_empty: bool = False) -> str | None:
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
        if message["role"] == "assistant" and not message["content"].strip():
            return f"{field}[{number}] is an assistant message with empty content, so nothing to learn from"
    if not any(message["role"] == "assistant" for message in messages):
        return f"field {field!r} has no assistant message, so nothing to learn from"
    return None


def _template_problems(messages: list[list[dict[str, str]]], problems: list[str], field: str,
                       roles: tuple[str, ...], template: str | dict[str, str] | None) -> dict[str, list[str]]:
    """`datasets.map` function: each row's problem, else its first message whose role is not in `roles`, else the
    template's refusal of it."""
    return {PROBLEM: [problem or _role_problem(conversation, field, roles) or _refusal_problem(conversation, template)
                      for conversation, problem in zip(messages, problems, strict=True)]}


def _role_problem(messages: list[dict[str, str]], field: str, roles: tuple[str, ...]) -> str:
    """Why a conversation is unusable for its roles ("" when every role is in `roles`)."""
    for number, message in enumerate(messages):
        if message["role"] not in roles:
            return (f"{field}[{number}] has role {message['role']!r}, which the chat template does not know: "
                    f"use one of {', '.join(roles)}")
    return ""


def _refusal_problem(messages: list[dict[str, str]], template: str | dict[str, str] | None) -> str:
    """Why `template` refuses to render a conversation ("" when it renders it)."""
    refusal = template_refusal(messages, template)
    if not refusal:
        return ""
    return (f"the tokenizer's chat template refuses this conversation ({refusal}): merge a system message into the "
            "first user turn, let user and assistant turns alternate, or choose a tokenizer whose template accepts it")
