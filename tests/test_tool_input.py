"""Bad input to miss-ds-eval, -generate, -convert and -reshard: one ``error:`` line naming the file or flag and what
to do, exit code 2, no traceback, before the model is loaded (or, for argparse's flags, its usage and one error line).

One tiny training run (two steps of the default job, on its random base) and its merged and PEFT exports are shared
by the tests; the tools run in this process where they fail before ``init_distributed`` (which exports the rank
variables), else as a user runs them.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.launch_utils import ROOT
from tests.test_cli import _error_line, _weightless_base
from tests.test_train import env

STEP = "step_00000002"
ARITH_EVAL = ROOT / "data/arith/eval.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The default job's output_dir after two steps: checkpoints/step_00000002 and the random base it saved."""
    out = tmp_path_factory.mktemp("tool_input") / "run"
    sets = ["train.max_steps=2", "train.warmup_steps=0", "checkpoint.every_steps=2", "eval.every_steps=2",
            "eval.max_batches=1", "eval.samples=0", "logging.progress=false", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/tiny-cpu.yaml",
                           *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and (out / "checkpoints" / STEP).is_dir(), proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exports(run) -> dict[str, Path]:
    """The run's checkpoint merged into its base ("merged") and exported as a PEFT MiSS adapter ("peft")."""
    from miss_ds.cli.convert import main as convert

    made = {}
    for flag in ("merge", "peft"):
        made[flag] = run.parent / flag
        assert convert(["--checkpoint", str(run / "checkpoints" / STEP), "--output", str(made[flag]),
                        f"--{flag}"]) == 0
    return {"merged": made["merge"], "peft": made["peft"]}


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)


def _flag_error(capsys, command, argv: list[str]) -> str:
    """argparse's refusal of a flag: exit code 2, its usage, then one ``error:`` line (returned)."""
    with pytest.raises(SystemExit) as exit_:
        command(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------- 1, 2: adapters
def test_peft_export_on_another_base_is_refused_and_on_its_own_taken(run, exports, tmp_path, capsys):
    from miss_ds.cli.evaluate import main as evaluate
    from miss_ds.cli.generate import main as generate
    from miss_ds.convert.output import FINGERPRINT_FILE
    from miss_ds.infer.source import resolve

    peft, merged = exports["peft"], exports["merged"]
    for command, rest in ((evaluate, ["--limit", "2"]), (generate, ["--prompt", "2 + 2?"])):
        assert command(["--adapter", str(peft), "--base", str(merged), *rest]) == 2
        err = _error_line(capsys)
        assert f"{peft} was trained on another base than {merged}" in err and "sampled weights differ, e.g. model." \
            in err, err
    lacking = shutil.copytree(run / "base", tmp_path / "lacking")
    weights = load_file(lacking / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]  # sampled by the fingerprint, as every adapted weight is
    save_file(weights, lacking / "model.safetensors", metadata={"format": "pt"})
    assert generate(["--adapter", str(peft), "--base", str(lacking), "--prompt", "2 + 2?"]) == 2
    assert f"{peft} adapts weights that {lacking} does not have" in _error_line(capsys)
    assert resolve(adapter=str(peft)).base == run / "base"  # the base it names, checked
    plain = shutil.copytree(peft, tmp_path / "plain")
    (plain / FINGERPRINT_FILE).unlink()  # a PEFT adapter made elsewhere records no fingerprint: taken as it is
    assert resolve(adapter=str(plain), base=str(merged)).peft_adapter == plain


def test_peft_export_given_as_checkpoint_is_named(exports, tmp_path, capsys):
    from miss_ds.cli.convert import main as convert
    from miss_ds.cli.evaluate import main as evaluate
    from miss_ds.cli.generate import main as generate
    from miss_ds.cli.reshard import main as reshard

    peft, exported_from = str(exports["peft"]), "give the miss_ds training checkpoint (or its adapter/) it was"
    for command, rest, advice in (
            (evaluate, ["--limit", "2"], "pass it as --adapter"),
            (generate, ["--prompt", "hi"], "pass it as --adapter"),
            (convert, ["--output", str(tmp_path / "m"), "--merge"], exported_from),
            (reshard, ["--tp", "2", "--output", str(tmp_path / "r")], exported_from)):
        assert command(["--checkpoint", peft, *rest]) == 2
        err = _error_line(capsys)
        assert f"error: {peft} is a PEFT adapter" in err and advice in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------------------------- 3: the base
def test_base_without_weights_is_named(tmp_path, capsys):
    from miss_ds.cli.generate import main as generate

    base = _weightless_base(tmp_path / "base")
    assert generate(["--base", str(base), "--config", "configs/tiny-cpu.yaml", "--prompt", "2 + 2?"]) == 2
    assert f"error: {base} has neither model.safetensors nor model.safetensors.index.json" in _error_line(capsys)
    proc = _tool("miss_ds.cli.evaluate", "--base", str(base), "--config", "configs/tiny-cpu.yaml", "--data",
                 str(ARITH_EVAL), "--limit", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: {base} has neither model.safetensors" in proc.stderr


def test_a_base_file_cut_short_is_named_by_the_tools(run, tmp_path, capsys):
    """safetensors' "incomplete metadata" traceback of a base cut short by a copy: one line naming the file."""
    from miss_ds.cli.convert import main as convert
    from miss_ds.cli.generate import main as generate

    base = shutil.copytree(run / "base", tmp_path / "cut")
    weights = base / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1)
    checkpoint = str(run / "checkpoints" / STEP)
    for command, rest in ((generate, ["--prompt", "2 + 2?"]), (convert, ["--output", str(tmp_path / "m"), "--merge"])):
        assert command(["--checkpoint", checkpoint, "--base", str(base), *rest]) == 2
        assert f"error: {weights} is cut short" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------- 4, 5: generate's flags
def test_device_is_checked_when_the_flags_are_read(monkeypatch, capsys):
    import torch

    from miss_ds.cli.generate import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "argument --device: 'cuda': this machine's torch" in _flag_error(capsys, parse_args, [
        "--base", "b", "--prompt", "hi", "--device", "cuda"])
    assert "argument --device: 'foo' is not a device" in _flag_error(capsys, parse_args, [
        "--base", "b", "--prompt", "hi", "--device", "foo"])


def test_empty_prompts_are_refused_and_a_long_answer_warned_about(tmp_path, capsys, caplog):
    from miss_ds.cli.generate import main as generate, parse_args

    for empty in ("", "  "):
        assert "argument --prompt: the prompt is empty" in _flag_error(capsys, parse_args, [
            "--base", "b", "--prompt", empty])
    base = _weightless_base(tmp_path / "base")  # max_position_embeddings 64
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n  \n")
    assert generate(["--base", str(base), "--config", "configs/tiny-cpu.yaml", "--prompts", str(blank)]) == 2
    assert f"error: --prompts = {blank} holds no prompt (every line is blank)" in _error_line(capsys)
    with caplog.at_level("WARNING"):
        assert generate(["--base", str(base), "--config", "configs/tiny-cpu.yaml", "--prompt", "2 + 2?",
                         "--max-new-tokens", "100"]) == 2  # warned, then the weightless base refused
    assert "--max-new-tokens 100 runs past the model's max_position_embeddings (64)" in caplog.text
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------- 6: a run's directory
def test_run_directory_names_its_newest_checkpoint_and_leaves_it_alone(run, tmp_path, capsys):
    from miss_ds.cli.convert import main as convert
    from miss_ds.cli.evaluate import main as evaluate

    saving = run / "checkpoints" / ".tmp-save-in-progress"  # a running training's save: not this tool's to remove
    saving.mkdir()
    try:
        for path in (run, run / "checkpoints"):
            assert evaluate(["--checkpoint", str(path), "--limit", "2"]) == 2
            err = _error_line(capsys)
            assert f"error: {path} is not a checkpoint" in err and f"--checkpoint {run / 'checkpoints' / STEP}" in err
        assert convert(["--checkpoint", str(run), "--output", str(tmp_path / "out"), "--peft"]) == 2
        assert f"--checkpoint {run / 'checkpoints' / STEP}" in _error_line(capsys)
        assert saving.is_dir()
    finally:
        saving.rmdir()


# ----------------------------------------------------------------------------------------------- 7: --tp
def test_eval_tp_in_one_process_speaks_of_the_tool(run, exports, capsys):
    from miss_ds.cli.evaluate import main as evaluate

    proc = _tool("miss_ds.cli.evaluate", "--checkpoint", str(run / "checkpoints" / STEP), "--tp", "2", "--limit", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: --tp 2 needs a multiple of 2 ranks and this job has 1: start it with deepspeed --num_gpus 2 " \
           "--module miss_ds.cli.evaluate" in proc.stderr and "parallel.tp_size" not in proc.stderr
    assert evaluate(["--base", str(exports["merged"]), "--tp", "2", "--limit", "2"]) == 2
    assert "error: --tp 2 splits a base plus a miss_ds checkpoint" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------- 8, 9: convert's output
def test_output_under_a_file_and_bad_shard_sizes_are_refused(run, tmp_path, capsys):
    from miss_ds.cli.convert import main as convert, parse_args
    from miss_ds.cli.reshard import main as reshard

    checkpoint = str(run / "checkpoints" / STEP)
    (tmp_path / "file").write_text("")
    under = str(tmp_path / "file" / "sub")
    assert convert(["--checkpoint", checkpoint, "--output", under, "--merge"]) == 2
    assert f"error: --output {under} cannot be created in {tmp_path / 'file'} (Not a directory)" in \
        _error_line(capsys)
    assert reshard(["--checkpoint", checkpoint, "--tp", "2", "--output", under]) == 2
    assert f"error: --output {under} cannot be created" in _error_line(capsys)
    for size, want in (("5XB", "'5XB' is not a size: write an integer and a unit"),
                       ("-1GB", "'-1GB' is not a positive size"), ("0MB", "'0MB' is not a positive size")):
        assert f"argument --max-shard-size: {want}" in _flag_error(capsys, parse_args, [
            "--checkpoint", checkpoint, "--output", "o", "--merge", f"--max-shard-size={size}"])


def test_merge_onto_a_base_without_tokenizer_warns(run, tmp_path, capsys, caplog):
    from miss_ds.cli.convert import main as convert

    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(run / "base" / name, base / name)
    with caplog.at_level("WARNING"):
        assert convert(["--checkpoint", str(run / "checkpoints" / STEP), "--base", str(base), "--output",
                        str(tmp_path / "merged"), "--merge"]) == 0
    assert f"{base} has no tokenizer (tokenizer_config.json), so the merged model in {tmp_path / 'merged'} has none" \
        in caplog.text and "the run's tokenizer (data/arith/tokenizer)" in caplog.text
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------- 10: data files
def _rows() -> list[dict]:
    return [json.loads(line) for line in ARITH_EVAL.read_text().splitlines()[:20]]


def _read(path: Path):
    from miss_ds.data.config import DataConfig
    from miss_ds.data.sources import read_rows

    return read_rows(str(path), DataConfig(format="instruction"), "eval", "--data")


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_a_pretty_printed_json_array_is_read(tmp_path, encoding):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(_rows(), indent=2), encoding=encoding)
    rows = _read(path)
    assert len(rows) == 20 and rows[0]["prompt"] == _rows()[0]["prompt"]


@pytest.mark.parametrize("name, under, want", [
    ("rows.json", "data", "it holds one JSON object spread over lines (line 1 is '{'). Write one row per line: its "
                          "rows look to be under 'data', so jq -c '.data[]' "),
    ("rows.jsonl", None, "it holds one JSON array spread over lines (line 1 is '['). Write one row per line: jq -c "
                         "'.[]' ")])
def test_one_json_document_is_refused_once(tmp_path, name, under, want):
    path = tmp_path / name
    path.write_text(json.dumps({under: _rows()} if under else _rows(), indent=2))
    with pytest.raises(ValueError) as error:
        _read(path)
    assert str(error.value).startswith(f"{path} is not JSON Lines (one object per line): {want}{path}"), error.value
    assert "\n" not in str(error.value)


def test_compressed_and_truncated_files_are_named(tmp_path):
    import datasets

    packed = tmp_path / "rows.jsonl"
    packed.write_bytes(gzip.compress(ARITH_EVAL.read_bytes()))
    with pytest.raises(ValueError, match=rf"^{packed} is gzip-compressed \(it starts with gzip's magic bytes\), not "
                                         rf"JSON text: unpack it first \(gzip -dc {packed} > rows.jsonl\)$"):
        _read(packed)
    whole = tmp_path / "whole.parquet"
    datasets.Dataset.from_list(_rows()).to_parquet(str(whole))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"^{cut} cannot be read \(Parquet magic bytes not found"):
        _read(cut)
