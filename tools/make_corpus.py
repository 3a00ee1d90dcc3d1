"""Write the shipped arithmetic corpus and its tokenizer.

    python tools/make_corpus.py --out data/arith

run from the repository root (tools/arith_corpus.py holds the generator and the tokenizer training). It takes a
few seconds and creates, under --out:
  train.jsonl       20,000 {"prompt", "response"} rows
  eval.jsonl        500 rows whose prompts are not in train.jsonl
  train_chat.jsonl  2,000 {"messages": [...]} conversations (some with two turns)
  tokenizer/        sentencepiece BPE tokenizer (vocab 512) trained on train.jsonl,
                    saved for transformers.AutoTokenizer, with a chat template

The rows are fully determined by --seed; the tokenizer's vocabulary and encodings are too (its JSON file may be
written differently by another tokenizers release). Commit the files again whenever arith_corpus.py changes.
"""

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from arith_corpus import chat_rows, instruction_rows, train_tokenizer


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """One compact JSON object per line, keys in insertion order."""
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory, e.g. data/arith")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--chat-rows", type=int, default=2_000)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    train = instruction_rows(args.train_rows, seed=args.seed)
    seen = frozenset(row["prompt"] for row in train)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", instruction_rows(args.eval_rows, seed=args.seed + 1, exclude=seen))
    write_jsonl(args.out / "train_chat.jsonl", chat_rows(args.chat_rows, seed=args.seed + 2))
    sentences = [text for row in train for text in (row["prompt"], row["response"])]
    train_tokenizer(sentences, args.out / "tokenizer", vocab_size=args.vocab_size)


if __name__ == "__main__":
    main()
