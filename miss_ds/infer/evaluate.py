"""Evaluate a model on a data file: loss/perplexity, and exact match where the format has reference answers.

Loss: the token-weighted mean cross-entropy of the labels the data pipeline builds for training (answers only for
"instruction" and "chat", every token for "text"), over every sequence of the file. Exact match: the greedy answer
(up to eos, special tokens dropped, whitespace stripped) equals the reference answer. With ``answer_regex`` the
answer is also extracted from both (the regex's first group, or its whole match): ``answer_found`` is the share of
generated answers the regex finds an answer in (well-formed ones), ``answer_match`` the share whose extracted answer
equals the reference's.

Rows are split over the data-parallel ranks (rank k takes rows k, k + dp, ...; the ranks of a TP group take the same
rows) and the sums are all-reduced, so any rank count gives the same report.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from ..data.config import DataConfig
from ..data.encode import IGNORE_INDEX
from ..data.rows import Advice
from ..distributed import ParallelLayout
from .examples import Example, read_examples
from .generate import answer

SAMPLES = 5  # rows shown in the report


@dataclass
class EvalSet:
    """What ``evaluate`` reads of a data file, all of it checked before a model is loaded."""

    path: str
    sequences: Dataset
    """The rows built as training builds its eval set (the loss)."""
    examples: list[Example]
    """The rows with a reference answer, as prompts (exact match)."""


def read_eval_set(tokenizer: Any, cfg: DataConfig, path: str, limit: Optional[int], key: str,
                  advice: Advice) -> EvalSet:
    """The first ``limit`` (all: None) rows of ``path`` (named by the setting ``key``) in ``cfg``'s format; bad rows
    raise ``ValueError`` (``advice`` says what to do) or are dropped, as ``cfg.on_bad_row`` says."""
    from ..data.pipeline import build_eval_set

    sequences, _ = build_eval_set(cfg, tokenizer, path, key, advice)
    if limit is not None:
        sequences = sequences.select(range(min(limit, len(sequences))))
    examples = read_examples(path, cfg, limit, tokenizer.chat_template, key, advice)
    return EvalSet(str(path), sequences, [e for e in examples if e.reference is not None])


@torch.no_grad()
def loss_sums(model: nn.Module, sequences: Dataset, layout: ParallelLayout, micro_batch_size: int
              ) -> tuple[float, int]:
    """(summed cross-entropy, label tokens) of this rank's share of ``sequences``."""
    sequences = sequences.with_format("torch")
    device = next(model.parameters()).device
    mine = list(range(layout.dp_rank, len(sequences), layout.dp))
    total, tokens = 0.0, 0
    for start in range(0, len(mine), micro_batch_size):
        batch = {k: v.to(device).long() for k, v in sequences[mine[start:start + micro_batch_size]].items()}
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        tokens += int((labels != IGNORE_INDEX).sum())
    return total, tokens


def extract(pattern: Optional[re.Pattern], text: str) -> Optional[str]:
    """The answer ``pattern`` finds in ``text``: its first group, or its whole match; None if it finds none."""
    found = pattern.search(text) if pattern is not None else None
    if found is None:
        return None
    return found.group(1) if pattern.groups else found.group(0)


def match_counts(examples: list[Example], answers: list[str], pattern: Optional[re.Pattern]) -> list[int]:
    """[rows, exact matches, answers found, answers matched] of examples with references."""
    counts = [0, 0, 0, 0]
    for example, got in zip(examples, answers):
        want = example.reference.strip()
        counts[0] += 1
        counts[1] += got == want
        found = extract(pattern, got)
        counts[2] += found is not None
        counts[3] += found is not None and found == extract(pattern, want)
    return counts


def evaluate(model: nn.Module, tokenizer: Any, cfg: DataConfig, data: EvalSet, layout: ParallelLayout, *,
             micro_batch_size: int = 16, max_new_tokens: int = 64, answer_regex: Optional[str] = None,
             generate_batch_size: int = 128) -> dict[str, Any]:
    """The report of ``model`` on ``data`` (every rank calls it; each gets the whole report)."""
    device = next(model.parameters()).device
    loss, tokens = loss_sums(model, data.sequences, layout, micro_batch_size)
    mine = data.examples[layout.dp_rank::layout.dp]
    answers = answer(model, tokenizer, mine, cfg, max_new_tokens, generate_batch_size) if mine else []
    pattern = re.compile(answer_regex) if answer_regex else None
    sums = torch.tensor([loss, tokens, *match_counts(mine, answers, pattern)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
        sums /= layout.tp  # the ranks of a TP group evaluated the same rows
    loss_sum, tokens, rows, exact, found, matched = sums.tolist()
    mean = loss_sum / max(tokens, 1)
    report: dict[str, Any] = {"data": data.path, "format": cfg.format, "loss": mean, "perplexity": math.exp(mean),
                              "loss_tokens": int(tokens), "rows": int(rows),
                              "exact_match": exact / rows if rows else None}
    if pattern is not None:
        report.update(answer_regex=answer_regex, answer_found=found / rows if rows else None,
                      answer_match=matched / rows if rows else None)
    report["samples"] = [{"prompt": e.prompt_text(), "reference": e.reference, "answer": a}
                         for e, a in zip(mine[:SAMPLES], answers[:SAMPLES])]
    return report
