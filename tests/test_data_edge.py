"""Edge cases of the data a run reads: conversations its chat template refuses, and miss-ds-eval's eval sets (those
training evaluated, and the same rows for its loss and its answers)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaForCausalLM

from miss_ds.cli.generate import tool_advice
from miss_ds.data import DataConfig, SourceConfig, build_datasets
from miss_ds.data.pipeline import build_eval_splits
from miss_ds.infer.examples import read_examples
from tests.conftest import tiny_llama_config
from tests.launch_utils import ROOT
from tests.test_train import env

REFUSES_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
GOOD = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
SYSTEM = {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}
REFUSAL = ("chat.jsonl line 2: the tokenizer's chat template refuses this conversation (System role not supported): "
           "merge a system message into the first user turn")
PROBLEMS = [{"prompt": f"Tom has {a} apples and buys {b} more. How many apples does Tom have now?",
             "response": f"{a} + {b} = {a + b}. The answer is {a + b}."} for a, b in ((12, 7), (3, 4), (9, 5), (8, 8))]
TOO_LONG = {"prompt": "Tom counts: " + " ".join(str(n) for n in range(40)), "response": "40 numbers."}


@pytest.fixture(scope="module")
def tokenizer():
    """The shipped tokenizer, its chat template refusing a system turn (as Gemma 2's does)."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data/arith/tokenizer")
    tokenizer.chat_template = REFUSES_SYSTEM + tokenizer.chat_template
    return tokenizer


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_conversation_the_chat_template_refuses_is_a_bad_row_in_training(tmp_path, tokenizer):
    """Not a jinja2 TemplateError from deep inside encoding: the row is named by file and line with the template's
    message and what to do; on_bad_row "skip" drops and counts it."""
    path = write_rows(tmp_path / "chat.jsonl", [GOOD, SYSTEM, GOOD, GOOD])
    cfg = DataConfig(train_path=path, format="chat", seq_len=32)
    with pytest.raises(ValueError, match=rf"{re.escape(REFUSAL)}.*\nFix these rows, or set data.on_bad_row: \"skip\""):
        build_datasets(cfg, tokenizer)
    train, _, stats = build_datasets(DataConfig(train_path=path, format="chat", seq_len=32, on_bad_row="skip"),
                                     tokenizer)
    assert (stats.train.rows, stats.train.bad_rows, len(train)) == (3, 1, 3)


def test_a_conversation_the_chat_template_refuses_is_a_bad_row_for_eval_and_generate(tmp_path, tokenizer):
    """miss-ds-eval's and miss-ds-generate's readers (as the commands call them) report it before a model is loaded,
    with their own advice, or drop it with --on-bad-row skip."""
    path = write_rows(tmp_path / "chat.jsonl", [GOOD, SYSTEM, GOOD, GOOD])
    cfg = DataConfig(format="chat", seq_len=32)
    for read in (lambda cfg: build_eval_splits(cfg, tokenizer, tool_advice(), path=path, key="--data"),
                 lambda cfg: read_examples(path, cfg, None, tokenizer.chat_template, "--prompts", tool_advice())):
        with pytest.raises(ValueError, match=rf"{re.escape(REFUSAL)}.*\nFix these rows, or pass --on-bad-row skip"):
            read(cfg)
    skip = DataConfig(format="chat", seq_len=32, on_bad_row="skip")
    [split] = build_eval_splits(skip, tokenizer, tool_advice(), path=path, key="--data")
    assert (split.stats.rows, split.stats.bad_rows, len(split.rows), len(split.sequences)) == (3, 1, 3, 3)
    assert [example.prompt for example in read_examples(path, skip, None, tokenizer.chat_template)] == \
        [GOOD["messages"][:1]] * 3


def test_eval_rebuilds_the_eval_fraction_hold_out_as_training_split_it(tmp_path, tokenizer):
    """Without a file, the eval sets are the sources' hold-outs, each in its source's format: the sequences of
    training's own eval set (which mixes them)."""
    chats = write_rows(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": row["prompt"]},
                                                               {"role": "assistant", "content": row["response"]}]}
                                                 for row in PROBLEMS * 3])
    cfg = DataConfig(sources=[SourceConfig(path=write_rows(tmp_path / "train.jsonl", PROBLEMS * 4)),
                              SourceConfig(path=chats, format="chat")], eval_fraction=0.25, seq_len=64, seed=3)
    splits = build_eval_splits(cfg, tokenizer, tool_advice())
    assert [(split.name, split.cfg.format, split.stats.rows) for split in splits] == [
        (f"the eval_fraction hold-out of {tmp_path / 'train.jsonl'}", "instruction", 4),
        (f"the eval_fraction hold-out of {chats}", "chat", 3)]
    trained = build_datasets(cfg, tokenizer)[1]  # its sources' rows mixed (seeded), so compared as a multiset
    assert sorted(ids for split in splits for ids in split.sequences["input_ids"]) == sorted(trained["input_ids"])


def test_eval_reads_what_training_evaluated_and_the_same_rows_for_loss_and_answers(tmp_path):
    """miss-ds-eval of a run with data.sources and no --data: every source's eval_path, each in its format, reported
    over all and per file; with --on-bad-row skip a row longer than seq_len is left out of both the loss and the
    answers, and counted once."""
    shipped = AutoTokenizer.from_pretrained(ROOT / "data/arith/tokenizer")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=len(shipped))).save_pretrained(tmp_path / "base")
    shipped.save_pretrained(tmp_path / "base")
    train = write_rows(tmp_path / "train.jsonl", PROBLEMS)
    evals = write_rows(tmp_path / "eval.jsonl", [PROBLEMS[0], TOO_LONG, PROBLEMS[1], PROBLEMS[2]])
    chat_evals = write_rows(tmp_path / "chat_eval.jsonl", [GOOD, GOOD])
    run = yaml.safe_load((ROOT / "configs/tiny-cpu.yaml").read_text())
    run["data"] = {"sources": [{"path": train, "eval_path": evals},
                               {"path": chat_evals, "eval_path": chat_evals, "format": "chat"},
                               {"path": train, "format": "text", "text_field": "prompt"}],
                   "format": "instruction", "seq_len": 48, "on_bad_row": "skip"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    proc = subprocess.run([sys.executable, "-m", "miss_ds.cli.evaluate", "--base", str(tmp_path / "base"), "--config",
                           str(tmp_path / "run.yaml"), "--max-new-tokens", "2", "--output", str(tmp_path / "r.json")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"] == [evals, chat_evals] and report["format"] == ["instruction", "chat"]
    assert (report["rows"], report["skipped_bad_rows"], report["skipped_too_long_rows"]) == (5, 0, 1)
    first, second = report["sets"]
    assert (first["data"], first["rows"], first["skipped_too_long_rows"], second["rows"]) == (evals, 3, 1, 2)
    assert report["loss_tokens"] == first["loss_tokens"] + second["loss_tokens"]
    prompts = [row["prompt"] for row in PROBLEMS[:3]] + ["2 + 2?"] * 2
    assert [sample["prompt"] for sample in report["samples"]] == prompts  # all answered: the used rows, no other
