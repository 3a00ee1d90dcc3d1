"""Packed training equals unpacked training: a packed micro-batch's loss and D gradients against the same
examples run one by one (padded), in every data format, with eager and sdpa attention, in one-row layout, and
at TP=2 under DeepSpeed (one 2-rank launch of ``tests/dist/packing_tp.py``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from miss_ds import MissConfig, apply_miss
from miss_ds.data import DataConfig, as_one_row, build_datasets, eval_batches
from tests.conftest import tiny_llama_config
from tests.launch_utils import ROOT, deepspeed_run, result_of
from tests.packing_reference import loss_and_d_grads

sys.path.insert(0, str(ROOT / "tools"))
from arith_corpus import chat_rows, instruction_rows  # noqa: E402

FORMATS = ("instruction", "chat", "text")
SEQ_LEN = 128


def format_rows(fmt: str) -> list[dict]:
    if fmt == "chat":
        return chat_rows(8, seed=3)
    rows = instruction_rows(10, seed=4)
    return rows if fmt == "instruction" else [{"text": f"{r['prompt']} {r['response']}"} for r in rows]


def format_tokenizer(fmt: str):
    """The shipped tokenizer; for "text" without bos, so every example's first token is a real token that the
    previous example's eos must not be trained to predict (the classic packing bug)."""
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "arith" / "tokenizer")
    if fmt == "text":
        tokenizer.bos_token = None
    return tokenizer


def packed_and_padded(fmt: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    """All packed sequences of the format's rows as one micro-batch, and every example as its own padded row."""
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in format_rows(fmt)))
    tokenizer = format_tokenizer(fmt)
    packed, _, stats = build_datasets(DataConfig(train_path=str(path), format=fmt, seq_len=SEQ_LEN, pack=True),
                                      tokenizer)
    padded, _, _ = build_datasets(DataConfig(train_path=str(path), format=fmt, seq_len=SEQ_LEN), tokenizer)
    assert stats.train.sequences < stats.train.rows  # several examples share a sequence
    batch = next(eval_batches(packed, micro_batch_size=len(packed)))
    return batch, list(eval_batches(padded, micro_batch_size=1))


def tiny_miss_model(attn: str) -> LlamaForCausalLM:
    cfg = tiny_llama_config(vocab_size=512, use_cache=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    apply_miss(model, MissConfig(r=8, init_weights=False))
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_batch_equals_examples_one_by_one(tmp_path, fmt, attn):
    packed, one_by_one = packed_and_padded(fmt, tmp_path)
    model = tiny_miss_model(attn)
    want_loss, want_grads = loss_and_d_grads(model, one_by_one)
    for layout in (packed, as_one_row(packed)):  # one row: the layout flash attention's varlen path reads
        loss, grads = loss_and_d_grads(model, [layout])
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # The comparison can fail: without position ids, attention and rotary cross example boundaries; with each
    # example's first token as a label, the previous example's eos learns to predict it.
    crossed = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss.detach()
    positions = packed["position_ids"]
    starts = (positions == 0) & (torch.nn.functional.pad(positions[:, 1:], (0, 1)) == 1)  # not padding
    bleeding = {**packed, "labels": torch.where(starts, packed["input_ids"], packed["labels"])}
    for wrong in (crossed, model(**bleeding).loss.detach()):
        assert not torch.allclose(wrong, want_loss, rtol=1e-5, atol=1e-6)


def test_flash_varlen_sees_exactly_the_examples(tmp_path):
    """What flash attention gets from a one-row packed batch: cumulative lengths at every example boundary
    (padding tokens are one-token sequences), as transformers derives them from the position ids."""
    packed, one_by_one = packed_and_padded("instruction", tmp_path)
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(as_one_row(packed)["position_ids"])
    lengths = cu_seqlens.diff().tolist()
    examples = sorted(int(row["attention_mask"].sum()) for row in one_by_one)
    assert sorted(n for n in lengths if n > 1) == examples
    assert sum(lengths) == packed["input_ids"].numel()


def test_packed_batch_at_tp2_equals_examples_one_by_one(tmp_path):
    """Every format in one 2-rank launch: the TP=2 engine's loss and D gradients on a packed micro-batch against
    a single-device model run on the examples one by one."""
    cases = {fmt: packed_and_padded(fmt, tmp_path) for fmt in FORMATS}
    data = tmp_path / "cases.pt"
    torch.save(cases, data)
    proc = deepspeed_run("tests/dist/packing_tp.py", ["--data", str(data)], ranks=2)
    result = result_of(proc)
    assert result["failures"] == [], result["failures"]
    assert proc.returncode == 0
    assert sorted(result["formats"]) == sorted(FORMATS)
