"""Bad input to the run config and to miss-ds-plan-memory: each refused when the config is read, in one ``error:``
line naming the file, line, key or flag and what to do (exit code 2, no traceback)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from miss_ds.cli.plan_memory import main as plan_memory
from miss_ds.run_config import ConfigError, load_config
from tests.launch_utils import ROOT

TINY_CPU = ROOT / "configs" / "tiny-cpu.yaml"


def refusal(*overrides: str, config: Path = TINY_CPU) -> str:
    """The ConfigError message of loading ``config`` with ``overrides`` (the test fails if it loads)."""
    with pytest.raises(ConfigError) as err:
        load_config(config, list(overrides), check_files=False)
    return str(err.value)


def line_of(text: str, start: str) -> int:
    """The 1-based number of the first line of ``text`` that starts with ``start``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start))


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys silently (a second ``train:`` dropped the whole first section): the
    file, the dotted key and both places are named, at any depth and in a --set value; a merge may still override."""
    text = TINY_CPU.read_text()
    config = tmp_path / "run.yaml"
    config.write_text(text + "train:\n  lr: 1.0e-3\n")
    assert refusal(config=config) == (
        f"{config}: key 'train' is given twice, at line {line_of(text, 'train:')}, column 1 and line "
        f"{len(text.splitlines()) + 1}, column 1 (YAML would keep the second silently): merge the two into one")
    config.write_text(text.replace("  lr: 1.0e-2\n", "  lr: 1.0e-2\n  lr: 1.0e-3\n"))
    lr = line_of(text, "  lr: 1.0e-2")
    assert refusal(config=config).startswith(f"{config}: key 'train.lr' is given twice, at line {lr}, column 3 "
                                             f"and line {lr + 1}, column 3")
    assert refusal("deepspeed={a: {b: 1, b: 2}}").startswith(
        "--set 'deepspeed={a: {b: 1, b: 2}}': key 'a.b' is given twice, at line 1, column 6 and line 1, column 12")
    config.write_text(text + "deepspeed:\n  base: &base {steps_per_print: 5}\n  <<: *base\n  steps_per_print: 7\n")
    assert load_config(config, check_files=False).deepspeed["steps_per_print"] == 7


def test_a_config_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path):
    config = tmp_path / "latin1.yaml"
    original = b"output_dir: runs/tiny-cpu\n"
    config.write_bytes(TINY_CPU.read_bytes().replace(original, "output_dir: runs/f\u00fcr\n".encode("latin-1")))
    offset = TINY_CPU.read_bytes().index(original) + len("output_dir: runs/f")
    assert refusal(config=config) == (f"{config} is not UTF-8 text: byte {offset} (line "
                                      f"{line_of(TINY_CPU.read_text(), 'output_dir:')}) is b'\\xfc'; save the file "
                                      "as UTF-8")


@pytest.mark.parametrize("implementation, package", [("flash_attention_2", "pip install flash-attn"),
                                                     ("flash_attention_3", "flash_attn_interface")])
def test_flash_attention_without_its_package_is_refused_when_read(monkeypatch, implementation, package):
    """transformers raised its ImportError only when the model was built, after the data; with the package, or the
    kernels package transformers falls back to, the config loads."""
    module = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}[implementation]
    find_spec = importlib.util.find_spec
    installed: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else
                        None if name in (module, "kernels") else find_spec(name, *a))
    message = refusal(f"model.attn_implementation={implementation}")
    assert message.startswith(f"--set 'model.attn_implementation={implementation}': model.attn_implementation="
                              f"'{implementation}' needs ") and package in message, message
    assert "pip install kernels" in message and message.endswith("or use one of ['eager', 'sdpa', 'flex_attention']")
    for name in (module, "kernels"):
        installed = {name}
        cfg = load_config(TINY_CPU, [f"model.attn_implementation={implementation}"], check_files=False)
        assert cfg.model.attn_implementation == implementation


@pytest.mark.parametrize("value", ["''", "'  '"])
def test_an_empty_output_dir_is_refused_when_read(tmp_path, value):
    """An empty output_dir trained into the current directory."""
    assert refusal(f"output_dir={value}").startswith(f"--set \"output_dir={value}\": 'output_dir' is {value}, which "
                                                     "would write the run into the current directory: name a directory")
    config = tmp_path / "run.yaml"
    config.write_text(TINY_CPU.read_text().replace("output_dir: runs/tiny-cpu", f"output_dir: {value}"))
    assert refusal(config=config).startswith(f"{config}: 'output_dir' is {value}")


@pytest.mark.parametrize("args, expect", [
    (["--set", "train.lr=abc"], "--set 'train.lr=abc': 'train.lr' must be a number, got 'abc'"),
    (["--set", "parallel.tp_size=2", "--world", "1"], "--world=1 must be a positive multiple of parallel.tp_size=2"),
    (["--set", "parallel.tp_size=2", "--world", "3"], "--world=3 must be a positive multiple of parallel.tp_size=2"),
    (["--world", "0"], "--world=0 must be a positive multiple of parallel.tp_size=1"),
    (["--gpu-gib", "-5"], "--gpu-gib=-5.0 must be a positive number of GiB"),
    (["--gpu-gib", "nan"], "--gpu-gib=nan must be a positive number of GiB"),
    (["--model-config", "/nonexistent/config.json"], "--model-config /nonexistent/config.json: "
                                                     "/nonexistent/config.json does not exist"),
    (["--set", "parallel.tp_size=8"], "parallel.tp_size=8 is more than the 2 key/value heads of this Llama model "
                                      "(4 query heads)"),
])
def test_plan_memory_refuses_bad_input_in_one_line_with_exit_2(capsys, args, expect):
    """Each used to be a traceback (exit 1, the code of "does not fit"), a ZeroDivisionError, or a plan that was
    silently wrong (DP=1 for 3 ranks at TP=2, a negative GPU, a TP size training refuses)."""
    assert plan_memory(["--config", str(TINY_CPU), *args]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {expect}") and out.err.count("\n") == 1, out.err
    assert "GiB" not in out.out


def test_plan_memory_reports_bad_input_apart_from_a_plan_that_does_not_fit(tmp_path):
    """The console script: bad input exits 2 with one error: line and no traceback; its help says which code is
    which."""
    config = tmp_path / "run.yaml"
    config.write_text(TINY_CPU.read_text() + "train:\n  lr: 1.0e-3\n")
    proc = subprocess.run([sys.executable, "tools/plan_memory.py", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {config}: key 'train' is given twice"), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    proc = subprocess.run([sys.executable, "tools/plan_memory.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert "Exit codes: 0 the plan fits; 1 it does not fit; 2 bad input" in proc.stdout
