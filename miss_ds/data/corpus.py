"""Seeded generator of small arithmetic word problems.

The rows are deliberately repetitive (a handful of sentence templates, small
numbers) so that a tiny randomly initialised model lowers its loss within a few
hundred steps: a quick, offline signal that MiSS fine-tuning works end to end.
"""

import random
from collections.abc import Callable, Iterator

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
