"""Greedy answers with transformers' ``generate``, in the prompt format the model was trained with.

Prompts of equal length are batched together, so no padding enters the model and each answer is what that prompt
alone would get. A tensor-parallel model works too: every rank of its group must call with the same examples.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from ..data.config import DataConfig
from ..data.encode import prompt_ids
from .examples import Example

logger = logging.getLogger(__name__)

#: Tokens an answer may have when the run that trained the model is not known (an export without its run config).
UNKNOWN_RUN_MAX_NEW_TOKENS = 128


def max_new_tokens(run_config: Any) -> int:
    """How long an answer may be by default: the run's ``data.seq_len`` (no trained sequence was longer), else
    ``UNKNOWN_RUN_MAX_NEW_TOKENS``."""
    return run_config.data.seq_len if run_config is not None else UNKNOWN_RUN_MAX_NEW_TOKENS


def check_room(prompts: Sequence[list[int]], max_new_tokens: int, positions: Optional[int]) -> None:
    """Warn when ``--max-new-tokens`` after the longest prompt runs past the model's ``max_position_embeddings``
    (``positions``; None: unknown): answers that long are generated on positions it was never trained on (rotary
    models go on, degrading; transformers only says so once it happens)."""
    longest = max(map(len, prompts), default=0)
    if positions is not None and longest + max_new_tokens > positions:
        logger.warning("--max-new-tokens %d runs past the model's max_position_embeddings (%d): the longest prompt has "
                       "%d tokens, so answers longer than %d tokens would run on positions the model was not trained "
                       "on", max_new_tokens, positions, longest, max(positions - longest, 0))


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: Sequence[list[int]], eos_id: int, pad_id: int, max_new_tokens: int,
                 batch_size: int = 128) -> list[list[int]]:
    """The greedy continuation of every prompt, up to (without) eos or ``max_new_tokens`` tokens."""
    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id,
                              pad_token_id=pad_id, use_cache=True)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    answers: list[list[int]] = [[] for _ in prompts]
    for length, indices in sorted(by_length.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            for index, row in zip(chunk, out[:, length:].tolist()):
                answers[index] = row[:row.index(eos_id)] if eos_id in row else row
    return answers


def answer(model: nn.Module, tokenizer: Any, examples: Sequence[Example], cfg: DataConfig, max_new_tokens: int,
           batch_size: int = 128) -> list[str]:
    """The model's greedy answer text to every example, prompted as ``cfg``'s format trained it."""
    prompts = [prompt_ids(example.prompt, tokenizer, cfg) for example in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = generate_ids(model, prompts, tokenizer.eos_token_id, pad, max_new_tokens, batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def format_samples(examples: Sequence[Example], answers: Sequence[str]) -> str:
    """Examples with the model's answers (and the reference, marked when they agree), for people to read."""
    lines = []
    for number, (example, got) in enumerate(zip(examples, answers), 1):
        lines.append(f"[{number}] {example.prompt_text()}")
        lines.append(f"    model:     {got}")
        if example.reference is not None:
            mark = "(same)" if got == example.reference.strip() else "(differs)"
            lines.append(f"    reference: {example.reference.strip()}  {mark}")
    return "\n".join(lines)
