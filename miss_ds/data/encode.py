"""Turn checked rows into token ids and loss labels, one encoder per data format.

Labels are aligned with `input_ids` (not shifted: Hugging Face causal LMs shift
them inside the loss) and hold `IGNORE_INDEX` wherever no loss should be taken.
Every encoded example starts with bos (when the tokenizer has one) and ends with
eos. Its first label is always `IGNORE_INDEX`: no token of the example predicts it,
and in a packed sequence the previous example's last token must not learn to.

`prompt_ids` is the one rule for what a model is given to answer: exactly the tokens
its training examples put before the loss starts. Training (`encode_batch`) and
generation and evaluation (`miss_ds.infer`) both build prompts with it.

`template_refusal` says which conversations a chat template refuses to render (its
`raise_exception`, e.g. Gemma 2's and Mistral's for a system turn or turns that do not
alternate), so that the row checks (`rows.py`) make them bad rows before anything is encoded.
"""

import os
from typing import Any

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from miss_ds.data.config import DataConfig

IGNORE_INDEX = -100
# What `template_refusal` renders the special tokens as.
_NO_SPECIAL_TOKENS = dict.fromkeys(PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, "")

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
        contexts = _instruction_contexts(batch[cfg.prompt_field], tokenizer, cfg)
        encoded = _encode_instructions(contexts, batch[cfg.response_field], tokenizer)
    else:
        encoded = _encode_texts(batch[cfg.text_field], tokenizer)
    return {
        "input_ids": [ids for ids, _ in encoded],
        "labels": [[IGNORE_INDEX] + labels[1:] for _, labels in encoded],
        "length": [len(ids) for ids, _ in encoded],
    }


def prompt_ids(prompt: str | list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[int]:
    """The token ids a model trained on `cfg`'s format is given to answer `prompt`.

    "instruction": bos + prompt + `prompt_separator`; "chat": the conversation (a
    string is one user message; a list must not end with an assistant turn) through
    the chat template up to its generation prompt, cut as training cuts it; "text":
    bos + the text, to be continued.
    """
    if cfg.format == "chat":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if messages and messages[-1]["role"] == "assistant":
            raise ValueError("a chat prompt must end with the turn to answer, not with an assistant message")
        pieces = [text for text, _ in _chat_segments(messages, tokenizer, add_generation_prompt=True)]
        return [token for ids in _token_ids(pieces, tokenizer) for token in ids]
    if not isinstance(prompt, str):
        raise TypeError(f'data.format "{cfg.format}" takes a prompt string, not {type(prompt).__name__}')
    if cfg.format == "instruction":
        return _instruction_contexts([prompt], tokenizer, cfg)[0]
    return _bos(tokenizer) + _token_ids([prompt], tokenizer)[0]


def _instruction_contexts(prompts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> list[list[int]]:
    """bos + prompt + separator, tokenised apart from the response so the prompt/response boundary is exact."""
    bos = _bos(tokenizer)
    return [bos + ids for ids in _token_ids([prompt + cfg.prompt_separator for prompt in prompts], tokenizer)]


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _token_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Plain LM: loss on every token but bos."""
    bos, eos = _bos(tokenizer), [tokenizer.eos_token_id]
    return [(bos + ids + eos, [IGNORE_INDEX] * len(bos) + ids + eos) for ids in _token_ids(texts, tokenizer)]


def _encode_instructions(contexts: list[list[int]], responses: list[str], tokenizer: PreTrainedTokenizerBase
                         ) -> list[Encoded]:
    """Each prompt's context (`_instruction_contexts`) then its response and eos; loss on the response and eos."""
    eos = [tokenizer.eos_token_id]
    return [(context + response + eos, [IGNORE_INDEX] * len(context) + response + eos)
            for context, response in zip(contexts, _token_ids(responses, tokenizer), strict=True)]


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


def template_refusal(messages: list[dict[str, str]], template: str | dict[str, str] | None) -> str:
    """The message with which `template` (a tokenizer's chat template, or its named templates) refuses one of the
    renders that encoding `messages` takes (`_renders`), or "" when it refuses none.

    A refusal is the template's `raise_exception`. The template is rendered alone, with every special token empty (a
    template refuses a conversation for its roles, not for those tokens), so that rows can be checked where only the
    template is known; any other error of the template is left for encoding to raise.
    """
    source = template.get("default") if isinstance(template, dict) else template
    if not source:
        return ""
    for part, generation_prompt in _renders(messages):
        try:
            render_jinja_template([part], chat_template=source, add_generation_prompt=generation_prompt,
                                  **_NO_SPECIAL_TOKENS)
        except TemplateError as error:
            return str(error) if type(error) is TemplateError else ""  # subclasses: undefined names, syntax
    return ""


def _renders(messages: list[dict[str, str]], add_generation_prompt: bool = False
             ) -> list[tuple[list[dict[str, str]], bool]]:
    """(conversation, add_generation_prompt) of every render `_chat_segments` takes, in its order: the whole
    conversation, then the conversation before and through each assistant turn."""
    renders = [(messages, add_generation_prompt)]
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            renders += [(messages[:index], True), (messages[: index + 1], False)]
    return renders


def _chat_segments(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                   add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces.

    An assistant turn is the text the template adds when message i is appended to
    the conversation rendered up to a generation prompt (exactly what the model is
    asked to produce at inference), as far as the whole conversation renders that
    text there too: a template may close a conversation with text it renders only
    at its very end (Phi-3's adds eos when no generation prompt follows), which
    then belongs to the last turn alone. Works with any template that renders each
    conversation as an extension of its prefixes up to such closing text (all
    common ones do). With `add_generation_prompt` the last piece ends with the
    generation prompt (`prompt_ids`).
    """
    whole, *rendered = [_render(part, tokenizer, prompt) for part, prompt in _renders(messages, add_generation_prompt)]
    assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    segments: list[tuple[str, bool]] = []
    done = 0
    for index, prompt, turn in zip(assistant_turns, rendered[0::2], rendered[1::2], strict=True):
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
