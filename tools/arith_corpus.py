"""The shipped arithmetic corpus: a seeded generator of word problems and the sentencepiece tokenizer trained on it.

Development code (tools/make_corpus.py writes data/arith with it; tests/test_data.py checks the shipped files
against it); the training library never imports it.

The rows are deliberately repetitive (a handful of sentence templates, small numbers) so that a tiny randomly
initialised model lowers its loss within a few hundred steps: a quick, offline signal that MiSS fine-tuning works end
to end. The sentencepiece model is converted by transformers into a `tokenizers`-backed tokenizer (`tokenizer.json`),
so `AutoTokenizer.from_pretrained(directory)` loads it offline without sentencepiece installed.
"""

import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

NAMES = ("Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva")
ITEMS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "coins", "cards")

Row = dict[str, str]


def _answer(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {op} {b} = {result}. The answer is {result}."


def _buy(rng: random.Random, name: str, item: str) -> Row:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    prompt = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    return {"prompt": prompt, "response": _answer(a, "+", b, a + b)}


def _gift(rng: random.Random, name: str, item: str) -> Row:
    a, b = rng.randint(2, 50), rng.randint(2, 50)
    prompt = f"{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have?"
    return {"prompt": prompt, "response": _answer(a, "+", b, a + b)}


def _give_away(rng: random.Random, name: str, item: str) -> Row:
    a = rng.randint(3, 99)
    b = rng.randint(1, a - 2)
    prompt = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    return {"prompt": prompt, "response": _answer(a, "-", b, a - b)}


def _take_out(rng: random.Random, name: str, item: str) -> Row:
    a = rng.randint(3, 99)
    b = rng.randint(1, a - 2)
    prompt = f"There are {a} {item} in a box. {name} takes out {b}. How many {item} are still in the box?"
    return {"prompt": prompt, "response": _answer(a, "-", b, a - b)}


def _bags(rng: random.Random, name: str, item: str) -> Row:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?"
    return {"prompt": prompt, "response": _answer(a, "*", b, a * b)}


def _shelf(rng: random.Random, name: str, item: str) -> Row:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = f"{name} puts {item} on a shelf in {a} rows of {b}. How many {item} are on the shelf?"
    return {"prompt": prompt, "response": _answer(a, "*", b, a * b)}


TEMPLATES: tuple[Callable[[random.Random, str, str], Row], ...] = (
    _buy,
    _gift,
    _give_away,
    _take_out,
    _bags,
    _shelf,
)


def problems(seed: int) -> Iterator[Row]:
    """Endless stream of `{"prompt", "response"}` rows, fully determined by `seed`."""
    rng = random.Random(seed)
    while True:
        template = rng.choice(TEMPLATES)
        yield template(rng, rng.choice(NAMES), rng.choice(ITEMS))


def instruction_rows(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Row]:
    """`n` rows from `problems(seed)`, skipping any whose prompt is in `exclude`.

    `exclude` keeps an eval split disjoint from the training split.
    """
    rows: list[Row] = []
    for row in problems(seed):
        if len(rows) == n:
            break
        if row["prompt"] not in exclude:
            rows.append(row)
    return rows


def chat_rows(n: int, seed: int, follow_up_rate: float = 0.3) -> list[dict[str, list[Row]]]:
    """`n` conversations in `{"messages": [...]}` form; some have a second user/assistant turn.

    Multi-turn rows exercise masking of every assistant turn, not only the last one.
    """
    rng = random.Random(seed)
    stream = problems(seed + 1)
    conversations = []
    for _ in range(n):
        turns = 2 if rng.random() < follow_up_rate else 1
        messages = []
        for _ in range(turns):
            row = next(stream)
            messages.append({"role": "user", "content": row["prompt"]})
            messages.append({"role": "assistant", "content": row["response"]})
        conversations.append({"messages": messages})
    return conversations


UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each message is "<|role|>\n" + content; an assistant turn ends with eos (what the
# model learns to emit), other turns with a newline.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """Train on `texts` (one sentence each) and save a loadable tokenizer with chat template to `out_dir`.

    Ids 0-3 are unk, bos, eos, pad; the role markers are single tokens; digits are
    split one per token (simpler arithmetic); characters outside the training
    text fall back to bytes, so any input encodes without unk. Text is not
    normalised and no leading space is added, so pieces concatenate exactly.
    """
    with tempfile.TemporaryDirectory() as workdir:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=f"{workdir}/tokenizer",  # transformers looks for tokenizer.model
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            user_defined_symbols=list(ROLE_MARKERS),
            num_threads=1,  # deterministic output, so the shipped files are reproducible
            minloglevel=2,
        )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir, pad_token=PAD)
    # Said explicitly, since transformers releases convert sentencepiece's user-defined symbols differently
    # (added special tokens, or a pre-tokenizer split): the role markers are special tokens either way.
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_MARKERS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer
