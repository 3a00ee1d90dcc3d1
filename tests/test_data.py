"""Tests of miss_ds.data: shipped corpus and tokenizer, row checks, masking, packing, sharding, resume."""

import json
import re
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer

from miss_ds.data import (IGNORE_INDEX, BatchIterator, DataConfig, SourceConfig, as_one_row, build_datasets,
                          count_tokens, eval_batches, loss_tokens)
from miss_ds.data.mixing import mix_counts, source_indices
from miss_ds.data.sequences import best_fit_decreasing

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "data" / "arith"
sys.path.insert(0, str(ROOT / "tools"))
from arith_corpus import chat_rows, instruction_rows, train_tokenizer  # noqa: E402

PROBLEMS = [
    {"prompt": "Tom has 12 apples and buys 7 more. How many apples does Tom have now?",
     "response": "12 + 7 = 19. The answer is 19."},
    {"prompt": "Mia has 3 bags with 4 coins in each bag. How many coins does Mia have in total?",
     "response": "3 * 4 = 12. The answer is 12."},
    {"prompt": "Leo has 9 cards and gives away 5. How many cards are left?",
     "response": "9 - 5 = 4. The answer is 4."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ARITH / "tokenizer")


def write_lines(path: Path, lines: list) -> Path:
    """Write rows (dicts, JSON-encoded) or raw strings, one per line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def real_tokens(dataset: Dataset, column: str) -> list[int]:
    """All non-padding values of `column`, sequences concatenated in order."""
    return [value for row in dataset for value, keep in zip(row[column], row["attention_mask"], strict=True) if keep]


# --- shipped corpus and tokenizer ---------------------------------------------------------------


def test_shipped_tokenizer_loads_and_round_trips(tokenizer):
    text = "Zoe has 12 apples and buys 7 more.\n12 + 7 = 19. Café ü 42!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids  # byte fallback covers characters never seen in training
    assert len({tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 4
    for marker in ("<|user|>", "<|assistant|>"):
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s><|user|>\nhi\n<|assistant|>\n"


def test_shipped_files_are_reproducible_and_correct(tmp_path):
    train = [json.loads(line) for line in (ARITH / "train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(line) for line in (ARITH / "eval.jsonl").read_text().splitlines()]
    chats = [json.loads(line) for line in (ARITH / "train_chat.jsonl").read_text().splitlines()]
    assert (len(train), len(evaluation), len(chats)) == (20_000, 500, 2_000)
    assert train[:50] == instruction_rows(50, seed=0)
    assert chats[:50] == chat_rows(50, seed=2)
    assert not {row["prompt"] for row in evaluation} & {row["prompt"] for row in train}
    for row in train[:2000]:
        a, op, b, result = re.match(r"(\d+) ([-+*]) (\d+) = (\d+)\.", row["response"]).groups()
        assert eval(f"{a} {op} {b}") == int(result)
    sentences = [text for row in train for text in (row["prompt"], row["response"])]
    train_tokenizer(sentences, tmp_path)
    # What the retrained tokenizer does, not how a tokenizers release serialises it: the same vocabulary,
    # special tokens and chat template, and the same ids for every sentence of the corpus and its eval set.
    retrained, shipped = AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(ARITH / "tokenizer")
    assert retrained.get_vocab() == shipped.get_vocab()
    assert retrained.all_special_tokens == shipped.all_special_tokens
    assert retrained.chat_template == shipped.chat_template
    texts = sentences + [text for row in evaluation for text in (row["prompt"], row["response"])]
    texts += [shipped.apply_chat_template(chat["messages"], tokenize=False) for chat in chats]
    encode = {name: tok(texts, add_special_tokens=False)["input_ids"] for name, tok in
              (("retrained", retrained), ("shipped", shipped))}
    assert encode["retrained"] == encode["shipped"]


# --- formats and masking ------------------------------------------------------------------------


def test_instruction_labels_mask_exactly_the_prompt(tmp_path, tokenizer):
    cfg = DataConfig(train_path=str(write_lines(tmp_path / "train.jsonl", PROBLEMS)), seq_len=64)
    train, _, stats = build_datasets(cfg, tokenizer)
    assert stats.train.rows == len(PROBLEMS)
    for row, problem in zip(train, PROBLEMS, strict=True):
        context = 1 + len(tokenizer(problem["prompt"] + "\n", add_special_tokens=False)["input_ids"])
        response = tokenizer(problem["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = context + len(response)
        assert row["input_ids"][0] == tokenizer.bos_token_id
        assert row["labels"][:context] == [IGNORE_INDEX] * context
        assert row["labels"][context:length] == row["input_ids"][context:length] == response
        assert row["labels"][length:] == [IGNORE_INDEX] * (64 - length)
        assert row["input_ids"][length:] == [tokenizer.pad_token_id] * (64 - length)
        assert row["attention_mask"] == [1] * length + [0] * (64 - length)


def test_chat_labels_keep_only_assistant_turns(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": PROBLEMS[0]["prompt"]},
        {"role": "assistant", "content": PROBLEMS[0]["response"]},
        {"role": "user", "content": PROBLEMS[1]["prompt"]},
        {"role": "assistant", "content": PROBLEMS[1]["response"]},
    ]
    path = write_lines(tmp_path / "chat.jsonl", [{"messages": messages}])
    train, _, _ = build_datasets(DataConfig(train_path=str(path), format="chat", seq_len=128), tokenizer)
    row = train[0]
    pairs = zip(row["input_ids"], row["labels"], strict=True)
    trained = [(token, label) for token, label in pairs if label != IGNORE_INDEX]
    expected = []
    for message in messages[2::2]:
        expected += tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [label for _, label in trained] == expected
    assert all(token == label for token, label in trained)
    assert "Answer briefly" in tokenizer.decode(row["input_ids"])


def test_text_format_trains_on_all_but_bos(tmp_path, tokenizer):
    path = write_lines(tmp_path / "text.jsonl", [{"text": "one two three"}])
    train, _, stats = build_datasets(DataConfig(train_path=str(path), format="text", seq_len=16), tokenizer)
    ids, labels = real_tokens(train, "input_ids"), real_tokens(train, "labels")
    assert labels == [IGNORE_INDEX] + ids[1:]
    assert ids[-1] == tokenizer.eos_token_id and stats.train.loss_tokens == len(ids) - 1


def examples_of(sequence: dict) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) of each example in a packed sequence, cut where the position ids restart."""
    positions = sequence["position_ids"]
    starts = [i for i, p in enumerate(positions) if p == 0 and i + 1 < len(positions) and positions[i + 1] == 1]
    ends = starts[1:] + [max(i for i, p in enumerate(positions) if p != 0) + 1]
    return [(sequence["input_ids"][a:b], sequence["labels"][a:b]) for a, b in zip(starts, ends, strict=True)]


def test_packing_keeps_every_example_whole_with_its_own_positions(tmp_path, tokenizer):
    path = str(write_lines(tmp_path / "train.jsonl", instruction_rows(40, seed=5)))
    padded, _, padded_stats = build_datasets(DataConfig(train_path=path, seq_len=128), tokenizer)
    packed, _, stats = build_datasets(DataConfig(train_path=path, seq_len=128, pack=True), tokenizer)
    examples = [(row["input_ids"][: sum(row["attention_mask"])], row["labels"][: sum(row["attention_mask"])])
                for row in padded]
    packed_examples = [example for sequence in packed for example in examples_of(sequence)]
    assert sorted(packed_examples) == sorted(examples)  # each example once, whole, labels with it
    for sequence in packed:
        used = sum(len(ids) for ids, _ in examples_of(sequence))
        assert sequence["position_ids"][used:] == [0] * (128 - used)  # the tail is padding
        assert sequence["labels"][used:] == [IGNORE_INDEX] * (128 - used)
        assert all(labels[0] == IGNORE_INDEX for _, labels in examples_of(sequence))
    assert (stats.train.rows, stats.train.tokens, stats.train.loss_tokens) == \
        (40, padded_stats.train.tokens, padded_stats.train.loss_tokens)
    assert stats.train.sequences == len(packed) <= -(-stats.train.tokens // 128) + 1  # at most one above the bound
    assert stats.train.padding_fraction == round(1 - stats.train.tokens / (len(packed) * 128), 4)
    assert padded_stats.train.padding_fraction > 0.6


def test_best_fit_decreasing():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = [(7 * i) % 13 + 1 for i in range(200)]
    bins = best_fit_decreasing(lengths, 16)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 16 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 16) + 2


def test_packing_is_a_function_of_data_and_seed(tmp_path, tokenizer):
    path = str(write_lines(tmp_path / "train.jsonl", instruction_rows(60, seed=6)))
    cfg = DataConfig(train_path=path, seq_len=128, pack=True, seed=3)
    first, _, _ = build_datasets(cfg, tokenizer)
    write_lines(tmp_path / "copy.jsonl", instruction_rows(60, seed=6))  # same rows, another file: no shared cache
    again, _, _ = build_datasets(DataConfig(train_path=str(tmp_path / "copy.jsonl"), seq_len=128, pack=True, seed=3),
                                 tokenizer)
    other_seed, _, _ = build_datasets(DataConfig(train_path=path, seq_len=128, pack=True, seed=4), tokenizer)
    assert first.to_dict() == again.to_dict()
    assert first.to_dict() != other_seed.to_dict()
    assert sorted(e for s in first for e in examples_of(s)) == sorted(e for s in other_seed for e in examples_of(s))


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_packing_refuses_or_skips_an_example_longer_than_a_sequence(tmp_path, tokenizer, policy):
    path = write_lines(tmp_path / "long.jsonl", [*PROBLEMS, {"prompt": "x " * 200, "response": "y"}])
    cfg = DataConfig(train_path=str(path), seq_len=64, pack=True, on_bad_row=policy)
    if policy == "error":
        with pytest.raises(ValueError, match=r"long\.jsonl line 4: \d+ tokens, more than data.seq_len=64"):
            build_datasets(cfg, tokenizer)
        return
    packed, _, stats = build_datasets(cfg, tokenizer)
    assert (stats.train.rows, stats.train.too_long_rows) == (3, 1)


def test_packed_batches_count_tokens_and_resume_mid_epoch(tmp_path, tokenizer):
    path = str(write_lines(tmp_path / "train.jsonl", instruction_rows(80, seed=7)))
    packed, _, stats = build_datasets(DataConfig(train_path=path, seq_len=64, pack=True), tokenizer)
    batches = list(eval_batches(packed, micro_batch_size=1))
    assert sorted(batches[0]) == ["input_ids", "labels", "position_ids"]
    assert sum(int(count_tokens(b)) for b in batches) == stats.train.tokens
    for one_row in (False, True):
        uninterrupted = BatchIterator(packed, micro_batch_size=4, dp_size=2, seed=5, one_row=one_row)
        per_epoch = uninterrupted.batches_per_epoch
        reference = [next(uninterrupted) for _ in range(2 * per_epoch)]
        first = BatchIterator(packed, micro_batch_size=4, dp_size=2, seed=5, one_row=one_row)
        for _ in range(per_epoch // 2):  # stop in the middle of the first epoch
            next(first)
        resumed = BatchIterator(packed, micro_batch_size=4, dp_size=2, seed=5, one_row=one_row)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for expected in reference[per_epoch // 2:]:
            batch = next(resumed)
            assert all(batch[name].equal(expected[name]) for name in expected)
        assert reference[0]["input_ids"].shape == ((1, 4 * 64) if one_row else (4, 64))
    rows = next(eval_batches(packed, micro_batch_size=4))
    assert count_tokens(as_one_row(rows)) == count_tokens(rows) == sum(int(count_tokens(b)) for b in batches[:4])


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ('{"prompt": "unterminated', "not valid JSON"),
        ('{"prompt": "a question"}', "missing field 'response'"),
        ('{"prompt": "a question", "response": 7}', "field 'response' should be a string"),
        (json.dumps({"prompt": "x " * 200, "response": "y"}), "more than data.seq_len=64"),
    ],
)
def test_bad_row_error_names_file_and_line(tmp_path, tokenizer, bad_line, reason):
    path = write_lines(tmp_path / "broken.jsonl", [PROBLEMS[0], "", PROBLEMS[1], bad_line, PROBLEMS[2]])
    with pytest.raises(ValueError) as error:
        build_datasets(DataConfig(train_path=str(path), seq_len=64), tokenizer)
    assert re.search(rf"broken\.jsonl line 4: [^\n]*{re.escape(reason)}", str(error.value))


def test_skip_mode_drops_and_counts_bad_rows(tmp_path, tokenizer):
    lines = [PROBLEMS[0], "not json", {"response": "no prompt"}, PROBLEMS[1],
             {"prompt": "x " * 200, "response": "y"}, PROBLEMS[2]]
    path = write_lines(tmp_path / "train.jsonl", lines)
    train, _, stats = build_datasets(DataConfig(train_path=str(path), seq_len=64, on_bad_row="skip"), tokenizer)
    assert (stats.train.bad_rows, stats.train.too_long_rows, stats.train.rows, len(train)) == (2, 1, 3, 3)


def test_empty_file_is_an_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty.jsonl contains no rows"):
        build_datasets(DataConfig(train_path=str(path)), tokenizer)


def test_all_rows_bad_in_skip_mode_is_an_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match="all 1 rows of .*bad.jsonl are bad"):
        build_datasets(DataConfig(train_path=str(path), on_bad_row="skip"), tokenizer)


def test_tokenizer_without_needed_tokens_is_an_error(tmp_path, tokenizer):
    path = str(write_lines(tmp_path / "train.jsonl", PROBLEMS))
    no_template = AutoTokenizer.from_pretrained(ARITH / "tokenizer")
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        build_datasets(DataConfig(train_path=path, format="chat"), no_template)
    no_pad = AutoTokenizer.from_pretrained(ARITH / "tokenizer")
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        build_datasets(DataConfig(train_path=path), no_pad)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"format": "csv"}, "data.format"), ({"seq_len": 1}, "data.seq_len"),
     ({"on_bad_row": "ignore"}, "data.on_bad_row"), ({"eval_fraction": 0.1, "eval_path": "e.jsonl"}, "eval_fraction")],
)
def test_config_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(train_path="train.jsonl", **change).validate()


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_chat_rows_with_a_role_the_template_does_not_know_or_an_empty_answer_are_bad(tmp_path, tokenizer):
    """As an empty response is in the instruction format; the template's own roles (here 'tool') stay usable."""
    good = chat(("user", PROBLEMS[0]["prompt"]), ("assistant", PROBLEMS[0]["response"]))
    lines = [good, chat(("human", "hi"), ("assistant", "hello")), good,
             chat(("system", "Be brief."), ("user", "hi"), ("assistant", " ")), good]
    path = write_lines(tmp_path / "chat.jsonl", lines)
    with pytest.raises(ValueError) as error:
        build_datasets(DataConfig(train_path=str(path), format="chat", seq_len=64), tokenizer)
    assert re.search(r"chat\.jsonl line 2: messages\[0\] has role 'human', which the chat template does not know: "
                     r"use one of assistant, system, user\n", str(error.value))
    assert re.search(r"chat\.jsonl line 4: messages\[2\] is an assistant message with empty content", str(error.value))
    _, _, stats = build_datasets(DataConfig(train_path=str(path), format="chat", seq_len=64, on_bad_row="skip"),
                                 tokenizer)
    assert (stats.train.bad_rows, stats.train.rows) == (2, 3)
    with_tool = AutoTokenizer.from_pretrained(ARITH / "tokenizer")
    with_tool.chat_template += "{% if messages[0]['role'] in ['tool', 'ipython'] %}{% endif %}"
    write_lines(path, [good, chat(("user", "2 + 2?"), ("tool", "4"), ("assistant", "4"))])
    assert len(build_datasets(DataConfig(train_path=str(path), format="chat", seq_len=64), with_tool)[0]) == 2


def test_rows_of_another_format_are_named_as_such(tmp_path, tokenizer):
    path = write_lines(tmp_path / "chat.jsonl", [chat(("user", "hi"), ("assistant", "hello"))] * 3)
    with pytest.raises(ValueError, match=r"chat\.jsonl line 1: missing field 'prompt': the row has 'messages', as "
                                         r"'chat' rows do, but rows are read as data.format 'instruction'"):
        build_datasets(DataConfig(train_path=str(path), format="instruction", seq_len=64), tokenizer)


def test_a_data_path_that_is_nowhere_is_refused_at_once_naming_its_key(tmp_path, tokenizer, monkeypatch):
    """Local-looking or unknown names are not sent to the Hub (10 retries offline); a cached dataset name loads."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    for name in ("bad/nope_dir", "./nope", "nope_name", str(tmp_path / "gone"), "owner/toy"):
        with pytest.raises(FileNotFoundError, match=rf"data.train_path = {re.escape(name)} does not exist here .* no "
                                                    "dataset in the datasets cache"):
            build_datasets(DataConfig(train_path=name), tokenizer)
    good = str(write_lines(tmp_path / "a.jsonl", PROBLEMS))
    with pytest.raises(FileNotFoundError, match=r"data.sources\[1\].eval_path = bad/nope.jsonl does not exist"):
        build_datasets(DataConfig(sources=[SourceConfig(path=good), SourceConfig(path=good,
                                                                                 eval_path="bad/nope.jsonl")]),
                       tokenizer)
    prepared = Path(datasets.load_dataset("json", data_files=good, split="train", cache_dir=str(tmp_path / "build"))
                    .cache_files[0]["filename"]).parent  # as load_dataset("owner/toy") leaves it in the cache
    cached = tmp_path / "cache" / "owner___toy" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, cached)
    (cached / "json-train.arrow").rename(cached / "toy-train.arrow")
    assert len(build_datasets(DataConfig(train_path="owner/toy", seq_len=64), tokenizer)[0]) == 3


def test_an_eval_file_is_read_and_labelled_as_eval(tmp_path, tokenizer, capfd):
    """miss-ds-eval's data: its progress bars say eval, and its bad rows get the advice the caller gives."""
    from miss_ds.data.pipeline import build_eval_splits
    from miss_ds.data.rows import Advice

    path = str(write_lines(tmp_path / "held_out.jsonl", PROBLEMS))
    capfd.readouterr()
    [split] = build_eval_splits(DataConfig(seq_len=64), tokenizer, Advice(), path=path, key="--data")
    sequences, stats = split.sequences, split.stats
    bars = capfd.readouterr().err
    assert len(sequences) == stats.rows == 3
    assert "Generating eval split" in bars and f"tokenising eval rows of {path}" in bars and "padding eval" in bars
    assert "train" not in bars
    write_lines(tmp_path / "held_out.jsonl", [*PROBLEMS, {"prompt": "q"}])
    with pytest.raises(ValueError, match="held_out.jsonl line 4: missing field 'response'\nFix these rows, or pass "
                                         "--on-bad-row skip to drop them"):
        build_eval_splits(DataConfig(seq_len=64), tokenizer, Advice(skip="pass --on-bad-row skip"), path=path,
                          key="--data")


# --- other sources ------------------------------------------------------------------------------


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_json_array(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows))


def write_arrow_stream(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)


@pytest.mark.parametrize(
    ("name", "write"),
    [("train.parquet", write_parquet), ("train.json", write_json_array), ("train.arrow", write_arrow_stream)],
)
def test_arrow_backed_files(tmp_path, tokenizer, name, write):
    path = tmp_path / name
    write(path, PROBLEMS * 2)
    train, _, stats = build_datasets(DataConfig(train_path=str(path), seq_len=64), tokenizer)
    assert stats.train.rows == len(train) == 6
    assert tokenizer.decode(train[1]["input_ids"], skip_special_tokens=True).startswith(PROBLEMS[1]["prompt"])
    write(path, [*PROBLEMS, {"prompt": "q", "response": None}])
    with pytest.raises(ValueError, match=rf"{re.escape(name)} row 3: field 'response' is null"):
        build_datasets(DataConfig(train_path=str(path), seq_len=64), tokenizer)


def test_save_to_disk_directory_with_splits(tmp_path, tokenizer):
    DatasetDict({"train": Dataset.from_list(PROBLEMS), "validation": Dataset.from_list(PROBLEMS[:1])}).save_to_disk(
        tmp_path / "saved"
    )
    cfg = DataConfig(train_path=str(tmp_path / "saved"), eval_path=str(tmp_path / "saved"), seq_len=64)
    train, evaluation, _ = build_datasets(cfg, tokenizer)
    assert (len(train), len(evaluation)) == (3, 1)


def test_rewritten_jsonl_is_read_again(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    write_lines(path, PROBLEMS)
    first, _, _ = build_datasets(DataConfig(train_path=str(path), seq_len=64), tokenizer)
    write_lines(path, PROBLEMS[:2])
    second, _, _ = build_datasets(DataConfig(train_path=str(path), seq_len=64), tokenizer)
    assert (len(first), len(second)) == (3, 2)


def test_directory_input_and_eval_fraction(tmp_path, tokenizer):
    write_lines(tmp_path / "a.jsonl", instruction_rows(30, seed=1))
    write_lines(tmp_path / "b.jsonl", instruction_rows(10, seed=2))
    cfg = DataConfig(train_path=str(tmp_path), seq_len=64, eval_fraction=0.25)
    train, evaluation, stats = build_datasets(cfg, tokenizer)
    assert (len(train), len(evaluation)) == (30, 10)
    assert stats.eval is not None and stats.eval.rows == 10


# --- batching -----------------------------------------------------------------------------------


def numbered_sequences(count: int, seq_len: int = 4) -> Dataset:
    """Sequence i is all i, so a batch shows which sequences it holds."""
    return Dataset.from_dict({
        "input_ids": [[i] * seq_len for i in range(count)],
        "labels": [[i] * seq_len for i in range(count)],
        "attention_mask": [[1] * seq_len for _ in range(count)],
    })


def epoch_ids(batches: BatchIterator) -> list[int]:
    return [int(i) for _ in range(batches.batches_per_epoch) for i in next(batches)["input_ids"][:, 0]]


@pytest.mark.parametrize("count", [24, 29])
def test_dp_shards_cover_an_epoch_without_overlap(count):
    data = numbered_sequences(count)
    shards = [epoch_ids(BatchIterator(data, micro_batch_size=2, dp_rank=rank, dp_size=3, seed=7)) for rank in range(3)]
    assert [len(shard) for shard in shards] == [8, 8, 8]
    everything = [i for shard in shards for i in shard]
    assert len(set(everything)) == 24 and set(everything) <= set(range(count))


def test_batches_shapes_types_and_tensor_parallel_peers_agree():
    data = numbered_sequences(20)
    peer_a = BatchIterator(data, micro_batch_size=4, dp_rank=1, dp_size=2, seed=3)
    peer_b = BatchIterator(data, micro_batch_size=4, dp_rank=1, dp_size=2, seed=3)
    for _ in range(5):  # crosses into the second epoch
        a, b = next(peer_a), next(peer_b)
        assert a["input_ids"].shape == (4, 4) and a["input_ids"].dtype == a["attention_mask"].dtype
        assert all(a[name].equal(b[name]) for name in a)
    epochs = BatchIterator(data, micro_batch_size=4, dp_rank=1, dp_size=2, seed=3)
    first_epoch, second_epoch = epoch_ids(epochs), epoch_ids(epochs)
    assert first_epoch != second_epoch  # reshuffled every epoch
    other_seed = BatchIterator(data, micro_batch_size=4, dp_rank=1, dp_size=2, seed=4)
    assert epoch_ids(other_seed) != first_epoch


def test_resume_continues_with_the_same_batches():
    data = numbered_sequences(30)
    uninterrupted = BatchIterator(data, micro_batch_size=4, dp_rank=0, dp_size=2, seed=11)
    reference = [next(uninterrupted)["input_ids"] for _ in range(12)]  # 3 batches per epoch: 4 epochs
    first = BatchIterator(data, micro_batch_size=4, dp_rank=0, dp_size=2, seed=11)
    for _ in range(5):
        next(first)
    resumed = BatchIterator(data, micro_batch_size=4, dp_rank=0, dp_size=2, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(next(resumed)["input_ids"].equal(expected) for expected in reference[5:])
    with pytest.raises(ValueError, match="data changed"):
        BatchIterator(numbered_sequences(31), micro_batch_size=4, dp_size=2, seed=11).load_state_dict(first.state_dict())


def global_steps(data, micro: int, dp: int, accum: int, steps: int, state: dict | None = None) -> list[list[int]]:
    """The sequences of each optimizer step, over all ranks and accumulation steps, in order."""
    ranks = [BatchIterator(data, micro_batch_size=micro, dp_rank=r, dp_size=dp, seed=3, accum_steps=accum)
             for r in range(dp)]
    for batches in ranks:
        if state is not None:
            batches.load_state_dict(state)
    return [sorted(int(i) for _ in range(accum) for batches in ranks for i in next(batches)["input_ids"][:, 0])
            for _ in range(steps)]


def test_resume_on_another_layout_takes_the_next_sequences_of_the_global_order():
    """A checkpoint of 2 ranks x micro-batch 4 resumes on 1 rank x 4 x accumulation 2, and on 4 ranks x 2: each later
    step trains on the same 8 sequences as the uninterrupted run, across an epoch boundary too."""
    data = numbered_sequences(30)  # 3 steps of 8 per epoch, 6 sequences left out of each
    reference = global_steps(data, micro=4, dp=2, accum=1, steps=8)
    first = BatchIterator(data, micro_batch_size=4, dp_rank=0, dp_size=2, seed=3)
    for _ in range(2):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    for micro, dp, accum in ((4, 1, 2), (2, 4, 1), (1, 2, 4)):
        assert global_steps(data, micro, dp, accum, steps=6, state=state) == reference[2:], (micro, dp, accum)
    with pytest.raises(ValueError, match="does not divide"):
        BatchIterator(data, micro_batch_size=4, dp_size=3, seed=3).load_state_dict(state)


def test_eval_batches_are_one_ordered_pass_over_every_sequence():
    """10 sequences in micro-batches of 2 on 2 ranks: 3 micro-batches each, the last run filled with copies of
    sequence 0 that take no loss; the real rows' labels are kept."""
    data = numbered_sequences(10)
    ranks = [list(eval_batches(data, 2, dp_rank=rank, dp_size=2)) for rank in (0, 1)]
    firsts = [[int(i) for batch in batches for i in batch["input_ids"][:, 0]] for batches in ranks]
    assert firsts == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 0, 0]]
    assert [int(loss_tokens(batch)) for batch in ranks[1]] == [int(loss_tokens(batch)) for batch in ranks[0][:2]] + [0]
    assert all(batch["input_ids"].shape == (2, 4) for batch in ranks[0] + ranks[1])
    assert int(loss_tokens(ranks[0][2])) > 0


# --- mixing sources --------------------------------------------------------------------------------


def test_mix_counts_and_source_indices():
    assert mix_counts([30, 10], [1, 3]) == [10, 30]
    assert mix_counts([5, 5], [1, 1000]) == [1, 10]  # every source keeps at least one row
    taken = source_indices(10, 25, seed=0, source=1).tolist()
    assert taken[:20] == list(range(10)) * 2  # whole passes first
    assert len(set(taken[20:])) == 5  # then a sample without repeats
    assert source_indices(10, 25, seed=0, source=1).tolist() == taken
    assert source_indices(10, 25, seed=1, source=1).tolist() != taken


def mixed_config(tmp_path: Path, **extra) -> DataConfig:
    """30 instruction rows at weight 1 and 10 chat rows (with 4 eval rows) at weight 3."""
    a = write_lines(tmp_path / "a.jsonl", instruction_rows(30, seed=8))
    b = write_lines(tmp_path / "b.jsonl", chat_rows(10, seed=9))
    b_eval = write_lines(tmp_path / "b_eval.jsonl", chat_rows(4, seed=10))
    return DataConfig(seq_len=128, sources=[SourceConfig(path=str(a)), SourceConfig(
        path=str(b), format="chat", weight=3, eval_path=str(b_eval))], **extra)


@pytest.mark.parametrize("pack", [False, True])
def test_sources_mix_by_weight_each_in_its_format(tmp_path, tokenizer, caplog, pack):
    cfg = mixed_config(tmp_path, pack=pack)
    with caplog.at_level("INFO", logger="miss_ds.data.pipeline"):
        train, evaluation, stats = build_datasets(cfg, tokenizer)
    assert [(s.format, s.weight, s.rows, s.taken) for s in stats.sources] == [("instruction", 1, 30, 10),
                                                                              ("chat", 3, 10, 30)]
    assert "a.jsonl (instruction, weight 1): 10 of 30; " in caplog.text and "b.jsonl (chat, weight 3): 30 of 10" in caplog.text
    assert stats.train.rows == 40 and stats.eval.rows == 4
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    if pack:
        examples = [ids for sequence in train for ids, _ in examples_of(sequence)]
    else:
        examples = [row["input_ids"][: sum(row["attention_mask"])] for row in train]
    chats = [tuple(ids) for ids in examples if assistant in ids]
    instructions = [tuple(ids) for ids in examples if assistant not in ids]
    assert len(instructions) == len(set(instructions)) == 10  # a sample without repeats
    assert len(chats) == 30 and all(chats.count(chat) == 3 for chat in chats)  # three whole passes
    again, _, _ = build_datasets(cfg, tokenizer)  # what a resumed run (or another rank) builds
    assert again.to_dict() == train.to_dict()


def test_sources_and_train_path_together_are_refused(tmp_path):
    cfg = mixed_config(tmp_path, train_path="train.jsonl")
    with pytest.raises(ValueError, match="data.sources and data.train_path/eval_path are both set"):
        cfg.validate()
    cfg = mixed_config(tmp_path)
    cfg.sources[1].weight = 0
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight is 0"):
        cfg.validate()


def test_run_config_names_a_misspelt_source_key(tmp_path):
    from miss_ds.run_config import ConfigError, load_config

    text = (ROOT / "configs" / "tiny-cpu.yaml").read_text().replace(
        "  train_path: data/arith/train.jsonl\n  eval_path: data/arith/eval.jsonl\n",
        "  sources:\n    - {path: data/arith/train.jsonl, weight: 2}\n"
        "    - {path: data/arith/train_chat.jsonl, format: chat, wieght: 1}\n")
    config = tmp_path / "mix.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"unknown key 'data.sources\[1\].wieght'; did you mean "
                                          r"'data.sources\[1\].weight'\?"):
        load_config(config)
    config.write_text(text.replace("wieght", "weight"))
    sources = load_config(config).data.sources
    assert [(s.path, s.format, s.weight) for s in sources] == [("data/arith/train.jsonl", None, 2.0),
                                                               ("data/arith/train_chat.jsonl", "chat", 1.0)]
