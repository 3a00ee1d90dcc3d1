"""The commands: setup.py's console scripts name the functions in miss_ds/cli/, and launch/ and tools/ run the same."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch_utils import ROOT
from tests.test_train import env

#: Console script -> (module, function), as setup.py declares them.
SCRIPTS = dict((name, (module, function)) for name, module, function in re.findall(
    r'"(miss-ds-[a-z-]+)=([\w.]+):(\w+)"', (ROOT / "setup.py").read_text()))
WRAPPERS = {"tools/convert_to_hf.py": "miss_ds.cli.convert", "tools/reshard.py": "miss_ds.cli.reshard",
            "tools/plan_memory.py": "miss_ds.cli.plan_memory"}


def test_console_scripts_are_the_cli_commands():
    assert set(SCRIPTS) == {"miss-ds-train", "miss-ds-convert", "miss-ds-reshard", "miss-ds-plan-memory",
                            "miss-ds-generate", "miss-ds-eval"}
    for name, (module, function) in SCRIPTS.items():
        assert callable(getattr(importlib.import_module(module), function)), name


def test_tools_wrap_the_cli_commands():
    for path, module in WRAPPERS.items():
        spec = importlib.util.spec_from_file_location(path, ROOT / path)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        assert tool.main is importlib.import_module(module).main, path


def test_train_help_exits_0_without_a_traceback():
    proc = subprocess.run([sys.executable, "launch/train.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "miss-ds-train" in proc.stdout and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------- bad input
def _weightless_base(path: Path) -> Path:
    """A tiny Llama's config (4 KV heads) and the arith tokenizer, without weights: a command that loads the model
    from it fails with a traceback, so an input error reported first was found before loading."""
    from transformers import AutoTokenizer

    from tests.conftest import tiny_llama_config

    tiny_llama_config().save_pretrained(path)
    AutoTokenizer.from_pretrained(ROOT / "data/arith/tokenizer").save_pretrained(path)
    return path


def _chat_file(path: Path) -> Path:
    row = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    path.write_text((json.dumps(row) + "\n") * 3)
    return path


def _error_line(capsys) -> str:
    """What a command printed to stderr: exactly one ``error: ...`` line."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_input_errors_print_one_line_and_exit_2_other_errors_keep_their_traceback(capsys):
    from miss_ds.cli.errors import reports_input_errors
    from miss_ds.families import UnsupportedModel

    def command(error: Exception):
        @reports_input_errors
        def main(argv=None) -> int:
            raise error
        return main

    assert command(UnsupportedModel("model_type 'bert' is not supported"))([]) == 2
    assert _error_line(capsys) == "error: model_type 'bert' is not supported\n"
    assert command(FileNotFoundError("x.jsonl does not exist"))([]) == 2
    with pytest.raises(RuntimeError, match="a bug"):
        command(RuntimeError("a bug"))([])


def test_reshard_refuses_a_tp_size_naming_its_flag(tmp_path, capsys):
    import torch
    from transformers import LlamaForCausalLM

    from miss_ds import MissConfig, adapter_io, apply_miss, fingerprint
    from miss_ds.cli.reshard import main as reshard
    from miss_ds.inject import adapter_state_dict
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    miss = MissConfig(r=8, target_modules=["q_proj", "v_proj"])
    apply_miss(model, miss)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    adapter_io.write_adapter_config(adapter, miss, model, 1, fingerprint.of_model(model))
    adapter_io.write_adapter_shard(adapter, adapter_state_dict(model, miss), 0, 1)
    assert reshard(["--checkpoint", str(adapter), "--tp", "5", "--output", str(tmp_path / "out")]) == 2
    err = _error_line(capsys)
    assert err.startswith("error: --tp=5 is more than the 4 key/value heads") and "Use --tp in [1, 2, 3, 4]" in err
    assert "parallel.tp_size" not in err and not (tmp_path / "out").exists()


def test_generate_and_eval_refuse_bad_input_before_loading_the_model(tmp_path, capsys):
    """A miss_ds checkpoint given as --adapter, an unsupported model family (as training refuses it), rows of another
    format, an --output that cannot be written, an invalid --answer-regex, a checkpoint that is not there."""
    from transformers import BertConfig

    from miss_ds.cli.convert import main as convert
    from miss_ds.cli.evaluate import main as evaluate
    from miss_ds.cli.generate import main as generate

    base = _weightless_base(tmp_path / "base")
    checkpoint = tmp_path / "step_00000010"
    (checkpoint / "adapter").mkdir(parents=True)
    (checkpoint / "adapter" / "adapter_config.json").write_text("{}")
    assert generate(["--adapter", str(checkpoint), "--prompt", "hi"]) == 2
    assert "is a miss_ds checkpoint or adapter, not a PEFT export: pass it as --checkpoint" in _error_line(capsys)
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    for command, data in ((generate, ["--prompt", "hi"]), (evaluate, ["--data", "data/arith/eval.jsonl"])):
        assert command(["--base", str(tmp_path / "bert"), *data]) == 2
        assert "model_type 'bert' is not supported" in _error_line(capsys)
    chats = str(_chat_file(tmp_path / "chat.jsonl"))
    assert generate(["--base", str(base), "--config", "configs/tiny-cpu.yaml", "--prompts", chats]) == 2
    err = capsys.readouterr().err
    assert "chat.jsonl line 1: missing field 'prompt': the row has 'messages', as 'chat' rows do" in err
    assert err.endswith("Fix these rows, or pass --on-bad-row skip to drop them.\n") and "Traceback" not in err
    assert evaluate(["--base", str(base), "--output", str(tmp_path / "nodir" / "report.json")]) == 2
    assert f"the directory {tmp_path / 'nodir'} does not exist" in _error_line(capsys)
    with pytest.raises(SystemExit) as exit_:
        evaluate(["--base", str(base), "--answer-regex", "The answer is ("])
    assert exit_.value.code == 2 and "--answer-regex: 'The answer is (' is not a valid regular expression" in \
        capsys.readouterr().err
    assert convert(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), "--merge"]) == 2
    assert "nope is neither a miss_ds adapter directory" in _error_line(capsys)


def test_eval_reads_its_data_before_loading_the_model(tmp_path):
    """A missing --data and bad rows stop miss-ds-eval (exit 2, one error) before the weightless base is loaded."""
    base = str(_weightless_base(tmp_path / "base"))
    for data, want in ((str(tmp_path / "nope.jsonl"), f"error: --data = {tmp_path / 'nope.jsonl'} does not exist"),
                       (str(_chat_file(tmp_path / "chat.jsonl")), "or pass --on-bad-row skip to drop them.")):
        proc = subprocess.run([sys.executable, "-m", "miss_ds.cli.evaluate", "--base", base, "--config",
                               "configs/tiny-cpu.yaml", "--data", data], cwd=ROOT, env=env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_submit_without_a_cluster_says_sbatch_failed(tmp_path, monkeypatch, capfd):
    """sbatch's own message, then one line naming its failure; the exit code is sbatch's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: fatal: Could not establish a configuration source' >&2\n"
                                    "exit 3\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    spec = importlib.util.spec_from_file_location("submit", ROOT / "launch/slurm/submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    monkeypatch.setattr(submit, "ROOT", tmp_path)  # its logs/ folder
    assert submit.main(["--config", str(ROOT / "configs/tiny-cpu.yaml")]) == 3
    err = capfd.readouterr().err
    assert err.endswith("sbatch: fatal: Could not establish a configuration source\nerror: sbatch failed with exit "
                        "code 3 (its message is above); nothing was submitted\n") and "Traceback" not in err


@pytest.mark.parametrize("flag, base_case", [("--lora", "bat"), ("--merge", "qwen2")])
def test_convert_refuses_an_adapter_that_does_not_fit_in_one_line(export_tp2, tmp_path, capsys, flag, base_case):
    """An adapter the export cannot take (``--lora`` of a bat adapter) or applied to another model (a Llama adapter
    onto the Qwen2 base) is bad input: one ``error:`` line naming the problem and exit 2, no traceback."""
    from miss_ds.cli import convert
    from tests.dist.export_make import STEP

    run = export_tp2 / "bat"
    code = convert.main(["--checkpoint", str(run / STEP), "--base", str(export_tp2 / base_case / "base"),
                         "--output", str(tmp_path / "out"), flag])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("launcher", [{"RANK": "1", "WORLD_SIZE": "2"}, {"OMPI_COMM_WORLD_RANK": "1",
                                      "OMPI_COMM_WORLD_SIZE": "2"}, {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0",
                                      "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n1"}])
def test_bad_input_is_printed_by_rank_0_alone_under_every_launcher(monkeypatch, capsys, launcher):
    """Under mpirun and srun (no RANK variable) rank 1 used to print the error line too (and log at INFO)."""
    from miss_ds.cli.errors import report_input_error
    from miss_ds.run_config import ConfigError

    for key in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in launcher.items():
        monkeypatch.setenv(key, value)
    assert report_input_error(ConfigError("bad")) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv(next(key for key in launcher if "RANK" in key or "PROCID" in key), "0")
    assert report_input_error(ConfigError("bad")) == 2 and capsys.readouterr().err == "error: bad\n"
