"""Evaluate a model on eval sets: loss/perplexity, and exact match where the format has reference answers.

The eval sets (``data.pipeline.build_eval_splits``) are a data file, or those the run's training evaluated (every
source's ``eval_path`` or ``eval_fraction`` hold-out), each in its own source's format. Both passes read the same
rows of a set: those that are usable and fit ``data.seq_len`` (the others were skipped and counted, or stopped the
command, as ``on_bad_row`` says).

Loss: the token-weighted mean cross-entropy of the labels the data pipeline builds for training (answers only for
"instruction" and "chat", every token for "text"), over every sequence of the set. Exact match: the greedy answer
(up to eos, special tokens dropped, whitespace stripped) equals the reference answer, over the rows that have one.
With ``answer_regex`` the answer is also extracted from both (the regex's first group, or its whole match):
``answer_found`` is the share of generated answers the regex finds an answer in (well-formed ones),
``answer_match`` the share whose extracted answer equals the reference's.

Rows are split over the data-parallel ranks (rank k takes rows k, k + dp, ...; the ranks of a TP group take the same
rows) and the sums are all-reduced, so any rank count gives the same report.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from ..data.encode import IGNORE_INDEX
from ..data.pipeline import EvalSplit
from ..distributed import ParallelLayout
from .examples import Example, example_of
from .generate import answer

SAMPLES = 5  # rows shown in the report


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


def evaluate(model: nn.Module, tokenizer: Any, data: list[EvalSplit], layout: ParallelLayout, *,
             micro_batch_size: int, max_new_tokens: int, answer_regex: Optional[str] = None,
             generate_batch_size: int = 128) -> dict[str, Any]:
    """The report of ``model`` on ``data`` (every rank calls it; each gets the whole report): one set's figures, or
    with several sets their figures over all of them, then each set's under "sets"."""
    device = next(model.parameters()).device
    pattern = re.compile(answer_regex) if answer_regex else None
    sums, samples = [], []
    for part in data:
        loss, tokens = loss_sums(model, part.sequences, layout, micro_batch_size)
        rows = part.rows.select(range(layout.dp_rank, len(part.rows), layout.dp))
        mine = [e for e in (example_of(row, part.cfg) for row in rows) if e.reference is not None]
        answers = answer(model, tokenizer, mine, part.cfg, max_new_tokens, generate_batch_size) if mine else []
        sums.append([loss, tokens, *match_counts(mine, answers, pattern)])
        samples += [{"prompt": e.prompt_text(), "reference": e.reference, "answer": a}
                    for e, a in zip(mine[:SAMPLES - len(samples)], answers)]
    totals = torch.tensor(sums, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
        totals /= layout.tp  # the ranks of a TP group evaluated the same rows
    if len(data) == 1:
        return {**_figures(totals[0].tolist(), data, answer_regex), "samples": samples}
    per_set = [{"source": part.source, **_figures(row, [part], answer_regex)}  # named as training logs it
               for row, part in zip(totals.tolist(), data)]
    return {**_figures(totals.sum(0).tolist(), data, answer_regex), "samples": samples, "sets": per_set}


def _figures(sums: list[float], parts: list[EvalSplit], answer_regex: Optional[str]) -> dict[str, Any]:
    """The report's figures of ``parts`` from their summed [loss, loss tokens, answered rows, exact matches, answers
    found, answers matched]: the files read, the rows used by both passes and those skipped, counted once."""
    loss_sum, tokens, answered, exact, found, matched = sums
    mean = loss_sum / max(tokens, 1)
    names, formats = [p.name for p in parts], [p.cfg.format for p in parts]
    figures: dict[str, Any] = {
        "data": names[0] if len(parts) == 1 else names, "format": formats[0] if len(parts) == 1 else formats,
        "loss": mean, "perplexity": math.exp(mean), "loss_tokens": int(tokens),
        "rows": sum(p.stats.rows for p in parts), "skipped_bad_rows": sum(p.stats.bad_rows for p in parts),
        "skipped_too_long_rows": sum(p.stats.too_long_rows for p in parts),
        "exact_match": exact / answered if answered else None}
    if answer_regex is not None:
        figures.update(answer_regex=answer_regex, answer_found=found / answered if answered else None,
                       answer_match=matched / answered if answered else None)
    return figures
