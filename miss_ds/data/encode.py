"""Turn checked rows into token ids and loss labels, one encoder per data format.

Labels are aligned with `input_ids` (not shifted: Hugging Face causal LMs shift
them inside the loss) and hold `IGNORE_INDEX` wherever no loss should be taken.
Every encoded example starts with bos (when the tokenizer has one) and ends with
eos. Its first label is always `IGNORE_INDEX`: no token of the example predicts it,
and in a packed sequence the previous example's last token must not learn to.
"""

import os
from typing import Any

from transformers import PreTrainedTokenizerBase

from miss_ds.data.config import DataConfig

IGNORE_INDEX = -100

Encoded = tuple[list[int], list[int]]  # (input_ids, labels)


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> None:
    """Raise `ValueError` if `tokenizer` lacks what `cfg.format` needs."""
    name = f"the tokenizer {tokenizer.name_or_path}" if getattr(tokenizer, "name_or_path", "") else "the tokenizer"
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name} has no eos token; every example ends with one: set tokenizer.eos_token")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{name} has no pad token, needed to fill sequences to data.seq_len: "
                         "set tokenizer.pad_token (tokenizer.eos_token works)")
    if cfg.format == "chat" and not tokenizer.chat_template:
        raise ValueError(f'data.format is "chat" but {name} has no chat_template: '
                         "set tokenizer.chat_template or use a tokenizer that ships one")


def encode_batch(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> dict[str, list]:
    """`datasets.map(batched=True)` function: rows of `cfg.format` -> input_ids, labels, length."""
    if cfg.format == "chat":
        encoded = [_encode_chat(messages, tokenizer) for messages in batch[cfg.messages_field]]
    elif cfg.format == "instruction":
        prompts = [prompt + cfg.prompt_separator for prompt in batch[cfg.prompt_field]]
        encoded = _encode_instructions(prompts, batch[cfg.response_field], tokenizer)
    else:
        encoded = _encode_texts(batch[cfg.text_field], tokenizer)
    return {
        "input_ids": [ids for ids, _ in encoded],
        "labels": [[IGNORE_INDEX] + labels[1:] for _, labels in encoded],
        "length": [len(ids) for ids, _ in encoded],
    }


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _token_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Plain LM: loss on every token but bos."""
    bos, eos = _bos(tokenizer), [tokenizer.eos_token_id]
    return [(bos + ids + eos, [IGNORE_INDEX] * len(bos) + ids + eos) for ids in _token_ids(texts, tokenizer)]


def _encode_instructions(prompts: list[str], responses: list[str], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Prompt and response tokenised apart, so the prompt/response boundary is exact; loss on the response and eos."""
    bos, eos = _bos(tokenizer), [tokenizer.eos_token_id]
    encoded = []
    for prompt, response in zip(_token_ids(prompts, tokenizer), _token_ids(responses, tokenizer), strict=True):
        context = bos + prompt
        encoded.append((context + response + eos, [IGNORE_INDEX] * len(context) + response + eos))
    return encoded


def _encode_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """Conversation through the chat template; loss on assistant turns only."""
    ids: list[int] = []
    labels: list[int] = []
    segments = _chat_segments(messages, tokenizer)
    for (_, trained), piece in zip(segments, _token_ids([text for text, _ in segments], tokenizer), strict=True):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
        labels.append(IGNORE_INDEX)
    return ids, labels


def _chat_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces.

    An assistant turn is the text the template adds when message i is appended to
    the conversation rendered up to a generation prompt (exactly what the model is
    asked to produce at inference), as far as the whole conversation renders that
    text there too: a template may close a conversation with text it renders only
    at its very end (Phi-3's adds eos when no generation prompt follows), which
    then belongs to the last turn alone. Works with any template that renders each
    conversation as an extension of its prefixes up to such closing text (all
    common ones do).
    """
    whole = _render(messages, tokenizer, add_generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(messages[:index], tokenizer, add_generation_prompt=True)
        turn = _render(messages[: index + 1], tokenizer, add_generation_prompt=False)
        if not (whole.startswith(prompt) and turn.startswith(prompt) and len(prompt) >= done):
            raise ValueError(f"the chat template does not render message {index} as an extension of the "
                             "conversation before it, so assistant turns cannot be located for loss masking")
        end = _shared_end(turn, whole, len(prompt), tokenizer)
        segments += [(whole[done:len(prompt)], False), (whole[len(prompt):end], True)]
        done = end
    return [(text, trained) for text, trained in segments + [(whole[done:], False)] if text]


def _shared_end(turn: str, whole: str, start: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """Where ``turn`` and ``whole`` (equal up to ``start``) part, moved back to the start of any special token of
    ``whole`` the parting point would cut (``<|end|>`` and ``<|user|>`` share their first characters)."""
    end = start + len(os.path.commonprefix([turn[start:], whole[start:]]))
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    moved = True
    while moved:
        moved = False
        for token in specials:
            at = whole.find(token, max(start, end - len(token) + 1))
            if at != -1 and at < end < at + len(token):
                end, moved = at, True
    return end


def _render(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
