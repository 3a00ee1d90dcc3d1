"""Examples to prompt a model with: rows of a data file in the run's format, or bare prompts.

An example is what ``data.encode.prompt_ids`` takes (the instruction prompt, the conversation before its last
assistant turn, or the text) and, where the format has one, the reference answer the model was trained to produce
(the response, or that last assistant turn).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.config import DataConfig
from ..data.rows import Advice


@dataclass(frozen=True)
class Example:
    prompt: str | list[dict[str, str]]
    reference: Optional[str] = None

    def prompt_text(self) -> str:
        """The prompt as one line of text (a conversation: its last message)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


def example_of(row: dict, cfg: DataConfig) -> Example:
    """The example of one checked row of ``cfg.format``."""
    if cfg.format == "instruction":
        return Example(row[cfg.prompt_field], row[cfg.response_field])
    if cfg.format == "chat":
        messages = row[cfg.messages_field]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return Example(messages[:last], messages[last]["content"])
    return Example(row[cfg.text_field])


def read_examples(path: str | Path, cfg: DataConfig, limit: Optional[int] = None,
                  template: str | dict[str, str] | None = None, key: str = "data.eval_path",
                  advice: Advice = Advice()) -> list[Example]:
    """The first ``limit`` (all: None) usable rows of a data file (any source ``data.train_path`` takes) as examples;
    a ``.txt`` file is one bare prompt per line (blank lines skipped; a file of none is refused).

    ``template``, the tokenizer's chat template, checks chat rows (``data.rows.with_template_problems``: roles it does
    not know, conversations it refuses; None: rows the run already checked);
    ``key`` is the setting that named ``path`` and ``advice`` what to do about bad rows, for errors.
    """
    if Path(path).suffix == ".txt":
        if not Path(path).is_file():
            raise FileNotFoundError(f"{key} = {path} does not exist (relative paths start at {Path.cwd()})")
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{key} = {path} holds no prompt (every line is blank): write one prompt per line")
        return [Example(line) for line in lines[:limit]]
    from ..data.pipeline import usable_rows

    rows, _ = usable_rows(str(path), cfg, "eval", key, template, advice)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return [example_of(row, cfg) for row in rows]
