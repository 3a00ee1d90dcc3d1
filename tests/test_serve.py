"""Serving what was trained: the exact LoRA export, the base fingerprint, the saved random base, the prompt rule,
and the default job end to end (its printed answers, generation from every export, evaluation on 1 and 2 ranks).

The TP=2 inputs (bases, adapters written by a 2-rank run, its logits) come from the 2-rank run the export tests
share (``export_tp2`` in conftest.py: ``tests/dist/export_make.py``).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from miss_ds import MissConfig, adapter_io, apply_miss, fingerprint
from miss_ds import functional as MF
from miss_ds.convert.lora import SERVER_WARNING, lora_factors, write_lora_adapter
from miss_ds.convert.merge import merge_to_hf
from miss_ds.convert.peft import write_peft_adapter
from miss_ds.convert.reshard import reshard_adapter
from miss_ds.data.config import DataConfig
from miss_ds.data.encode import IGNORE_INDEX, encode_batch, prompt_ids
from miss_ds.distributed import ParallelLayout
from miss_ds.hf_checkpoint import HFCheckpoint
from miss_ds.inject import adapter_state_dict
from miss_ds.loading import build_model_on_meta, materialize_random
from miss_ds.random_base import save_random_base
from tests.conftest import tiny_llama_config
from tests.dist.export_make import STEP, input_ids
from tests.launch_utils import ROOT, deepspeed_run
from tests.test_train import env


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids(model.config.vocab_size)).logits


# ----------------------------------------------------------------------------------------------- LoRA math
@pytest.mark.parametrize("mode,r,mini_r,in_features,out_features", [
    ("miss", 8, 1, 100, 64),     # a partial last chunk (100 = 12 x 8 + 4)
    ("miss", 16, 1, 64, 100),
    ("mini", 8, 4, 100, 64),     # D (8, 4) tiled along out
    ("mini", 5, 3, 23, 9),       # partial chunk and a partial last tile
])
def test_lora_factors_are_miss_delta_weight_in_float64(mode, r, mini_r, in_features, out_features):
    g = MF.MissGeometry(mode, r, mini_r, in_features, out_features)
    d = torch.randn(g.d_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = lora_factors(d, g)
    assert a.shape == (r, in_features) and b.shape == (out_features, r)
    assert set(a.unique().tolist()) == {0.0, 1.0} and torch.equal(a.sum(0), torch.ones(in_features, dtype=a.dtype))
    w = torch.randn(out_features, in_features, dtype=torch.float64)
    assert torch.equal(b @ a, MF.delta_weight(w, d, g))
    x = torch.randn(3, in_features, dtype=torch.float64)
    torch.testing.assert_close(x @ a.T, MF.aggregate(x, r), rtol=0, atol=1e-12)  # E x is MiSS's aggregation


def test_chunk_matrix_sums_the_chunks():
    assert MF.chunk_matrix(3, 7).tolist() == [[1, 0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1, 0]]
    # A shard starting at global feature 4: its first feature is position 4 mod 3 = 1.
    assert MF.chunk_matrix(3, 4, in_offset=4).tolist() == [[0, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]]


# ----------------------------------------------------------------------------------------------- LoRA export
@pytest.mark.parametrize("case", ["miss", "mini", "qwen2"])
def test_lora_export_of_a_tp2_checkpoint_gives_the_merged_and_the_tp_models_logits(export_tp2, tmp_path, case):
    """PEFT's LoraModel on the base = the merged checkpoint = the TP=2 MiSS model that wrote the adapter."""
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraModel

    run = export_tp2 / case
    out = write_lora_adapter(run / STEP, tmp_path / "lora", run / "base")
    config = LoraConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha, config.use_rslora) == (8, 8, False)
    assert sorted(config.target_modules) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]) and config.exclude_modules is None
    assert config.base_model_name_or_path == str((run / "base").resolve())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), str(out))
    assert isinstance(peft_model.base_model, LoraModel)
    lora = _logits(peft_model)
    _close(lora, torch.load(run / "logits_tp.pt"))
    merge_to_hf(run / STEP, run / "base", tmp_path / "merged")
    _close(lora, _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")))
    assert not torch.allclose(lora, torch.load(run / "logits_base.pt"), atol=1e-3), "the adapter changed nothing"


def test_lora_export_refuses_bat_and_names_the_merged_export(export_tp2, tmp_path, capsys):
    from miss_ds.cli.convert import main as convert

    code = convert(["--checkpoint", str(export_tp2 / "bat" / STEP), "--output", str(tmp_path / "lora"), "--lora"])
    assert code == 2  # bad input: one error line
    assert re.match(r"error: .*mode='bat'.*not low-rank.*--merge", capsys.readouterr().err)
    assert not (tmp_path / "lora").exists()


def test_lora_export_wraps_exactly_the_adapted_modules_and_warns_about_modules_to_save(tmp_path, caplog):
    """q_proj everywhere but in layer 0, plus a trained lm_head: exclude_modules keeps PEFT off layer 0's q_proj, and
    the lm_head travels as modules_to_save, which LoRA servers do not take (warned)."""
    from peft import PeftModel

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    base.save_pretrained(tmp_path / "base")
    miss = MissConfig(r=8, init_weights=False, target_modules=["q_proj", "down_proj"],
                      exclude_modules=["model.layers.0.self_attn.q_proj"], modules_to_save=["lm_head"])
    apply_miss(base, miss)
    with torch.no_grad():
        base.lm_head.weight.add_(torch.randn_like(base.lm_head.weight))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.write_adapter_config(adapter, miss, base, 1, fingerprint.of_model(base))
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(base, miss), 0, 1)
    with caplog.at_level(logging.WARNING):
        out = write_lora_adapter(adapter, tmp_path / "lora", tmp_path / "base")
    assert SERVER_WARNING.format(names=["lm_head"]) in caplog.text
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["exclude_modules"] == ["model.layers.0.self_attn.q_proj"]
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.lm_head.weight" in keys and len(keys) == 2 * 3 + 1
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(out))
    wrapped = {n.removesuffix(".lora_A.default") for n, _ in peft_model.named_modules() if n.endswith("lora_A.default")}
    assert wrapped == {f"base_model.model.model.layers.{i}.mlp.down_proj" for i in (0, 1)} | {
        "base_model.model.model.layers.1.self_attn.q_proj"}
    _close(_logits(peft_model), _logits(base))


# ----------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_of_a_tp2_model_is_read_back_from_its_base_on_disk(export_tp2):
    """The 2-rank run recorded the fingerprint its sharded model read; the base on disk gives the same values."""
    for case in ("miss", "qwen2", "random"):
        recorded = fingerprint.Fingerprint.from_json(
            adapter_io.read_adapter_config(export_tp2 / case / STEP / "adapter")["base_fingerprint"])
        assert len(recorded.positions) == fingerprint.SAMPLES
        assert len({key for key, _, _ in recorded.positions}) == 14  # every adapted weight of the tiny model
        with HFCheckpoint(export_tp2 / case / "base") as ckpt:
            assert fingerprint.read_checkpoint(ckpt, recorded.positions) == recorded.values


def _other_base(path: Path, seed: int = 5) -> Path:
    """A base of the tiny Llama's exact shape with other weights."""
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path


def test_another_base_of_the_same_shape_is_refused_by_name(export_tp2, tmp_path):
    ckpt = export_tp2 / "miss" / STEP
    other = _other_base(tmp_path / "other")
    for convert in (lambda: merge_to_hf(ckpt, other, tmp_path / "merged"),
                    lambda: write_peft_adapter(ckpt, tmp_path / "peft", other),
                    lambda: write_lora_adapter(ckpt, tmp_path / "lora", other),
                    lambda: reshard_adapter(ckpt, 1, tmp_path / "tp1", base=other)):
        with pytest.raises(fingerprint.OtherBaseError, match=r"trained on another base than .*other: \d+ of 64 "
                                                             r"sampled weights differ, e\.g\. model\.layers\."):
            convert()
    assert not any((tmp_path / name).exists() for name in ("merged", "peft", "lora", "tp1"))


def test_the_same_base_in_another_precision_is_accepted(export_tp2, tmp_path, caplog):
    """bf16 and fp16 copies of the fp32 base are the same base (fp16 may round a sample one bf16 step away)."""
    for dtype in (torch.bfloat16, torch.float16):
        AutoModelForCausalLM.from_pretrained(export_tp2 / "miss" / "base", dtype=dtype).save_pretrained(
            tmp_path / str(dtype))
        with caplog.at_level(logging.WARNING):
            merge_to_hf(export_tp2 / "miss" / STEP, tmp_path / str(dtype), tmp_path / f"merged-{dtype}")
    assert "trained on another base" not in caplog.text


def test_resharding_keeps_the_fingerprint(export_tp2, tmp_path):
    out = reshard_adapter(export_tp2 / "miss" / STEP, 3, tmp_path / "tp3")
    want = adapter_io.read_adapter_config(export_tp2 / "miss" / STEP / "adapter")["base_fingerprint"]
    assert adapter_io.read_adapter_config(out)["base_fingerprint"] == want
    merge_to_hf(out, export_tp2 / "miss" / "base", tmp_path / "merged")  # still checks, and passes


def test_an_adapter_without_a_fingerprint_is_converted_with_a_warning(export_tp2, tmp_path, caplog):
    adapter = shutil.copytree(export_tp2 / "miss" / STEP / "adapter", tmp_path / "adapter")
    meta = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**meta, "base_fingerprint": None}))
    with caplog.at_level(logging.WARNING):
        merge_to_hf(adapter, _other_base(tmp_path / "other"), tmp_path / "merged")
    assert "records no base fingerprint" in caplog.text


# ----------------------------------------------------------------------------------------------- random base
def test_a_saved_tp2_random_base_merges_by_default_and_gives_the_tp_models_logits(export_tp2, tmp_path):
    """The 2-rank run drew its random base per TP shard and saved it: the adapter records it as its base, so the merge
    finds it alone; the merged model is the TP=2 model."""
    run = export_tp2 / "random"
    assert adapter_io.read_adapter_config(run / STEP / "adapter")["base_model"]["name_or_path"] == str(run / "base")
    merge_to_hf(run / STEP, None, tmp_path / "merged")
    _close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), torch.load(run / "logits_tp.pt"))


def test_the_random_base_of_another_tp_layout_is_refused(export_tp2, tmp_path):
    """The same seed at TP=1 draws other split weights: another base, refused by the fingerprint."""
    model = build_model_on_meta(tiny_llama_config(), torch.float32)
    apply_miss(model, MissConfig(r=8))
    materialize_random(model, "cpu", torch.float32, seed=0)
    save_random_base(model, tmp_path / "tp1", None, ParallelLayout(0, 1, 1))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tp1" / "base").model.embed_tokens.weight.equal(
        AutoModelForCausalLM.from_pretrained(export_tp2 / "random" / "base").model.embed_tokens.weight)
    with pytest.raises(fingerprint.OtherBaseError, match="trained on another base"):
        merge_to_hf(export_tp2 / "random" / STEP, tmp_path / "tp1" / "base", tmp_path / "merged")


# ----------------------------------------------------------------------------------------------- prompt rule
@pytest.fixture(scope="module")
def arith_tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "data/arith/tokenizer")


def _context(ids: list[int], labels: list[int]) -> list[int]:
    """The tokens of a training example before its first trained one."""
    return ids[:next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]


def test_instruction_prompts_are_the_training_context(arith_tokenizer):
    cfg = DataConfig(train_path="unused", format="instruction")
    rows = [json.loads(line) for line in (ROOT / "data/arith/eval.jsonl").read_text().splitlines()[:20]]
    encoded = encode_batch({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]},
                           arith_tokenizer, cfg)
    for row, ids, labels in zip(rows, encoded["input_ids"], encoded["labels"]):
        want = _context(ids, labels)
        assert prompt_ids(row["prompt"], arith_tokenizer, cfg) == want
        assert want[0] == arith_tokenizer.bos_token_id and arith_tokenizer.decode(want[-1:]) == "\n"
        assert arith_tokenizer(row["prompt"]).input_ids != want  # the tokenizer alone adds neither


def test_chat_prompts_are_the_training_context_of_every_assistant_turn(arith_tokenizer):
    cfg = DataConfig(train_path="unused", format="chat")
    rows = [json.loads(line) for line in (ROOT / "data/arith/train_chat.jsonl").read_text().splitlines()[:10]]
    assert any(len(r["messages"]) > 2 for r in rows)
    for row in rows:
        messages = row["messages"]
        encoded = encode_batch({"messages": [messages]}, arith_tokenizer, cfg)
        ids, labels = encoded["input_ids"][0], encoded["labels"][0]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        # the tokens before the last assistant turn's first trained token
        starts = [i for i in trained if i == 0 or labels[i - 1] == IGNORE_INDEX]
        assert prompt_ids(messages[:last], arith_tokenizer, cfg) == ids[:starts[-1]]
    with pytest.raises(ValueError, match="must end with the turn to answer"):
        prompt_ids(rows[0]["messages"], arith_tokenizer, cfg)


# ----------------------------------------------------------------------------------------------- the default job
TINY_STEPS = 30
SAMPLES_HEADER = "the model's answers to 3 rows of data/arith/eval.jsonl:"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """The README's default job, shortened: one process on a random base, its samples printed at the end."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    sets = [f"output_dir={out}", f"train.max_steps={TINY_STEPS}", "train.warmup_steps=2", "eval.every_steps=0",
            "checkpoint.every_steps=0", "logging.progress=false"]
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny-cpu.yaml",
                           *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "checkpoint": out / "checkpoints" / f"step_{TINY_STEPS:08d}", "stdout": proc.stdout}


def test_a_moved_run_finds_the_random_base_beside_its_checkpoints(tiny_run, tmp_path):
    """The random base a run saved is found beside its checkpoints once the run directory has moved (--overwrite
    moves an old run aside, and a new run then saves another base at the old place): the recorded path is that old
    place, so the tools used to check the adapter against the wrong base."""
    from miss_ds.convert.source import known_base, read_adapter

    moved = shutil.copytree(tiny_run["out"], tmp_path / "moved")
    adapter = read_adapter(moved / "checkpoints" / tiny_run["checkpoint"].name)
    assert adapter.meta["base_model"]["name_or_path"] == str(tiny_run["out"] / "base")
    assert known_base(adapter) == moved / "base"


def _printed_answers(text: str) -> list[str]:
    return [line.split("model:", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("model:")]


def _generate(capsys, *args: str) -> list[str]:
    from miss_ds.cli.generate import main as generate

    capsys.readouterr()
    assert generate([*args, "--prompts", str(ROOT / "data/arith/eval.jsonl"), "--limit", "3"]) == 0
    return _printed_answers(capsys.readouterr().out)


def test_the_default_job_shows_its_answers_and_they_are_what_every_export_generates(tiny_run, tmp_path, capsys,
                                                                                     monkeypatch):
    """The run prints 3 eval rows with its answers; miss-ds-generate gives the same answers from the checkpoint (base
    found by itself), from the merged export and from the LoRA export (prompt format from their run config)."""
    from miss_ds.cli.convert import main as convert

    monkeypatch.chdir(ROOT)  # the run config's data and tokenizer paths are relative to the repository
    stdout = tiny_run["stdout"]
    assert SAMPLES_HEADER in stdout
    printed = _printed_answers(stdout[stdout.index(SAMPLES_HEADER):])
    rows = [json.loads(line) for line in (ROOT / "data/arith/eval.jsonl").read_text().splitlines()[:3]]
    assert len(printed) == 3 and all(row["prompt"] in stdout for row in rows)
    ckpt = str(tiny_run["checkpoint"])
    assert _generate(capsys, "--checkpoint", ckpt) == printed
    assert convert(["--checkpoint", ckpt, "--output", str(tmp_path / "merged"), "--merge"]) == 0
    assert _generate(capsys, "--base", str(tmp_path / "merged")) == printed
    assert convert(["--checkpoint", ckpt, "--output", str(tmp_path / "lora"), "--lora"]) == 0
    assert _generate(capsys, "--adapter", str(tmp_path / "lora")) == printed


def test_generate_prints_only_answers_on_stdout(tiny_run):
    """With the accelerator left to DeepSpeed to detect, its log line goes to stderr: stdout holds the answers alone
    (what a script piping miss-ds-generate reads)."""
    detect = {k: v for k, v in env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-m", "miss_ds.cli.generate", "--checkpoint", str(tiny_run["checkpoint"]),
                           "--prompt", "Eva had 18 pencils. How many pencils does Eva have?"], cwd=ROOT, env=detect,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "real_accelerator" in proc.stderr and "real_accelerator" not in proc.stdout, proc.stdout
    assert len(_printed_answers(proc.stdout)) == 1


def test_convert_and_reshard_print_one_line_on_stdout(tiny_run, tmp_path):
    """miss-ds-convert and miss-ds-reshard, with the accelerator left to DeepSpeed to detect: its log line goes to
    stderr, stdout holds the one line that says what was written; the resharded adapter keeps the run config."""
    from miss_ds.convert.source import read_adapter

    detect = {k: v for k, v in env().items() if k != "DS_ACCELERATOR"}
    ckpt = str(tiny_run["checkpoint"])
    for tool, extra in (("convert", ["--peft"]), ("reshard", ["--tp", "2"])):
        out = tmp_path / tool
        proc = subprocess.run([sys.executable, "-m", f"miss_ds.cli.{tool}", "--checkpoint", ckpt, "--output", str(out),
                               *extra], cwd=ROOT, env=detect, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "real_accelerator" in proc.stderr, (tool, proc.stderr[-3000:])
        assert proc.stdout.splitlines() == [proc.stdout.strip()] and str(out) in proc.stdout, proc.stdout
    # The resharded adapter carries the run config too, so the tools prompt it in the run's format.
    assert read_adapter(tmp_path / "reshard").run_config == read_adapter(ckpt).run_config is not None


def _eval_report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    return json.loads(text[text.index("{\n"):text.rindex("}") + 1])


def test_eval_on_one_and_two_ranks_reports_the_loss_of_the_merged_model(tiny_run, tmp_path):
    """miss-ds-eval: the same report on 1 rank, on 2 data-parallel ranks and on 2 tensor-parallel ranks; its loss is
    the token-weighted mean of Hugging Face's own loss of the merged export over the same sequences. On 1 rank, with
    the accelerator left to DeepSpeed to detect (its log line goes to stderr), stdout is the report alone."""
    from miss_ds.convert.merge import merge_to_hf
    from miss_ds.data import build_datasets

    args = ["--checkpoint", str(tiny_run["checkpoint"]), "--limit", "40", "--answer-regex", "The answer is (-?[0-9]+)"]
    detect = {k: v for k, v in env().items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-m", "miss_ds.cli.evaluate", *args, "--output",
                           str(tmp_path / "report.json")], cwd=ROOT, env=detect, capture_output=True, text=True,
                          timeout=600)
    one = _eval_report(proc)
    assert json.loads(proc.stdout) == json.loads((tmp_path / "report.json").read_text()) == one
    for layout in (["--tp", "1"], ["--tp", "2"]):
        two = _eval_report(deepspeed_run("--module", ["miss_ds.cli.evaluate", *args, *layout], 2))
        assert one["rows"] == two["rows"] == 40 and one["loss_tokens"] == two["loss_tokens"], layout
        for key in ("loss", "exact_match", "answer_found", "answer_match"):
            assert two[key] == pytest.approx(one[key], rel=1e-6), (layout, key)
    assert len(one["samples"]) == 5 and one["format"] == "instruction"

    merge_to_hf(tiny_run["checkpoint"], None, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    cfg = DataConfig(train_path=str(ROOT / "data/arith/eval.jsonl"), format="instruction", seq_len=64)
    sequences = build_datasets(cfg, tokenizer)[0].select(range(40)).with_format("torch")
    total = tokens = 0
    with torch.no_grad():
        for row in sequences:
            labels = row["labels"].long()[None]
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=row["input_ids"].long()[None], attention_mask=row["attention_mask"].long()[None],
                           labels=labels).loss.item() * n
            tokens += n
    assert tokens == one["loss_tokens"] and one["loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_exact_match_and_the_answer_regex():
    from miss_ds.infer.evaluate import match_counts
    from miss_ds.infer.examples import Example

    examples = [Example("q", "3 + 4 = 7. The answer is 7.")] * 4
    answers = ["3 + 4 = 7. The answer is 7.", "3 + 4 = 7.  The answer is 7", "2 + 5 = 7. The answer is 7.", "7"]
    pattern = re.compile(r"The answer is (-?[0-9]+)")
    assert match_counts(examples, answers, pattern) == [4, 1, 3, 3]  # rows, exact, answers found, answers matched
    assert match_counts(examples, answers, None) == [4, 1, 0, 0]
