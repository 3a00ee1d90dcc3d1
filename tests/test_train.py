"""launch/train.py end to end on CPU: the default config trains under deepspeed with TP=2 and with ZeRO-2,
a preempted run resumes to exactly the losses of an uninterrupted one, and bad input is refused clearly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.launch_utils import ROOT, free_port
from tests.test_metrics import pixels_of

CONFIG = "configs/tiny-cpu.yaml"
QUICK = ["train.max_steps=40", "eval.every_steps=20", "eval.max_batches=2", "checkpoint.every_steps=20",
         "logging.every_steps=1", "logging.progress=false", "train.warmup_steps=4"]


def train_cmd(ranks: int, out: Path, *overrides: str, resume: str | None = None) -> list[str]:
    sets = [a for o in (*QUICK, f"output_dir={out}", *overrides) for a in ("--set", o)]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                "--master_port", str(free_port())] if ranks > 1 else [sys.executable]
    return [*launcher, "launch/train.py", "--config", CONFIG, *sets, *(["--resume", resume] if resume else [])]


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def consumed_tokens(overrides: list[str], steps: int, dp: int) -> int:
    """Non-padding tokens of the micro-batches ``steps`` steps take from every DP rank, rebuilt from the data."""
    from transformers import AutoTokenizer

    from miss_ds.data import BatchIterator, build_datasets
    from miss_ds.run_config import load_config

    cfg = load_config(ROOT / CONFIG, [*QUICK, *overrides, "output_dir=unused"])
    train_ds, _, _ = build_datasets(cfg.data, AutoTokenizer.from_pretrained(cfg.tokenizer))
    micro_batches = steps * cfg.train.grad_accum_steps
    total = 0
    for rank in range(dp):
        batches = BatchIterator(train_ds, cfg.train.micro_batch_size, rank, dp, seed=cfg.data.seed)
        total += sum(int(next(batches)["attention_mask"].sum()) for _ in range(micro_batches))
    return total


@pytest.mark.parametrize("overrides,dp", [(["parallel.tp_size=2", "parallel.zero_stage=1"], 1),
                                          (["parallel.zero_stage=2"], 2)], ids=["tp2", "zero2-dp2"])
def test_default_config_trains_and_loss_falls(tmp_path, monkeypatch, overrides, dp):
    import matplotlib
    import matplotlib.image

    from miss_ds.train.metrics import PLOT_DPI, PLOT_INCHES, read_metrics

    proc = run(train_cmd(2, tmp_path, *overrides))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [line for line in proc.stderr.splitlines() if "trainable params" in line]  # rank 0 logs it once
    assert len(reports) == 1 and ("this rank's shards at TP=2" in reports[0]) == (dp == 1), reports
    losses = train_losses(tmp_path)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(38, 41)) / 3
    assert last < 0.7 * first, (first, last)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_loss"] < first
    monkeypatch.chdir(ROOT)  # the config's data paths are relative to the repository
    assert summary["tokens"] == consumed_tokens(overrides, 40, dp)
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"], rel=1e-3)
    logged = [r["tokens"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert logged[-1] == summary["tokens"] and logged == sorted(logged)
    image = matplotlib.image.imread(tmp_path / "loss.png")
    width, height = PLOT_INCHES
    assert image.shape == (height * PLOT_DPI, width * PLOT_DPI, 4)
    for color in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"][:2]:  # the eval and the train line
        assert pixels_of(image, color) > 400, color  # more than the legend swatch alone (~110)
    assert list((tmp_path / "tensorboard").iterdir())
    final = tmp_path / "checkpoints" / "step_00000040"
    assert (final / "manifest.json").is_file() and (final / "adapter" / "adapter_config.json").is_file()


def test_bf16_runs_take_the_same_steps_at_every_zero_stage(tmp_path):
    """The default job in bf16 for 6 steps at ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer, which makes Adam's state by
    stepping on zero gradients at start-up: ``ds_compat.ensure_optimizer_state`` sets the count back to 0) and at
    ZeRO-1 (its ZeRO optimizer), against float32 at ZeRO-0 (plain torch AdamW, no wrapper): every step's loss within
    0.3%. With the extra Adam step counted, ZeRO-0's first update was 0.74 lr and its loss 1.2% off at step 2."""
    runs = {}
    for name, dtype, zero in (("bf16-zero0", "bfloat16", 0), ("bf16-zero1", "bfloat16", 1), ("fp32", "float32", 0)):
        proc = run(train_cmd(1, tmp_path / name, f"model.dtype={dtype}", f"parallel.zero_stage={zero}",
                             "train.max_steps=6", "train.warmup_steps=2", "train.lr=3e-3", "eval.every_steps=0",
                             "checkpoint.every_steps=0", "eval.samples=0"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = train_losses(tmp_path / name)
    assert sorted(runs["fp32"]) == list(range(1, 7))
    for name in ("bf16-zero0", "bf16-zero1"):
        for step, loss in runs["fp32"].items():
            assert runs[name][step] == pytest.approx(loss, rel=3e-3), (name, runs)


def test_preempted_run_resumes_to_the_same_losses(tmp_path):
    from miss_ds.train.metrics import read_metrics

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    overrides = ("parallel.zero_stage=2", "checkpoint.every_steps=0")
    assert run(train_cmd(2, straight, *overrides)).returncode == 0
    reference = train_losses(straight)

    launcher = subprocess.Popen(train_cmd(2, broken, *overrides), cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = broken / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 12):
        assert launcher.poll() is None and time.time() < deadline, "training ended before it could be signalled"
        time.sleep(0.2)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if any(a.startswith("--local_rank") for a in p.cmdline())]  # the ranks, not launch.py
    assert len(workers) == 2
    for worker in workers:  # as Slurm does: the signal reaches every task
        worker.send_signal(signal.SIGUSR1)
    output, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 85, output[-3000:]
    saved = sorted((broken / "checkpoints").glob("step_*"))
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].name.split("_")[1])
    assert 12 <= stopped_at < 40

    resumed = run(train_cmd(2, broken, *overrides, resume="auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    losses = train_losses(broken)
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), f"step {step} (stopped at {stopped_at})"
    # summary.json counts the run's steps and tokens over both processes, its rates this process's alone
    whole, summary = (json.loads((out / "summary.json").read_text()) for out in (straight, broken))
    assert (summary["steps"], summary["tokens"]) == (whole["steps"], whole["tokens"]) == (40, whole["tokens"])
    assert summary["resumed_at_step"] == stopped_at and whole["resumed_at_step"] == whole["resumed_at_tokens"] == 0
    logged = {r["step"]: r["tokens"] for r in read_metrics(broken / "metrics.jsonl") if r["split"] == "train"}
    assert 0 < summary["resumed_at_tokens"] == logged[stopped_at] < summary["tokens"]
    assert summary["tokens_per_s"] == pytest.approx(
        (summary["tokens"] - summary["resumed_at_tokens"]) / summary["seconds"], rel=1e-3)


def run_cli(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    return run([sys.executable, "launch/train.py", "--config", str(cfg), *extra], timeout=120)


def base_yaml() -> str:
    return (ROOT / CONFIG).read_text()


def test_tp_grain_size_aligns_bat_blocks_with_mlp_shards(tmp_path):
    """bat r=32 on TP=2: the MLP's 352 features split 176/176, not whole 32-blocks, and the error names the fix;
    parallel.tp_grain_size=32 splits 192/160 and trains."""
    bat = ("miss.mode=bat", "miss.r=32", "parallel.tp_size=2", "train.max_steps=3", "train.warmup_steps=0",
           "eval.every_steps=0", "checkpoint.every_steps=0")
    refused = run(train_cmd(2, tmp_path / "even", *bat))
    assert refused.returncode != 0
    assert "'model.layers.0.mlp.gate_proj'" in refused.stdout + refused.stderr
    assert "out_features shards [176, 176]" in refused.stdout + refused.stderr
    assert "parallel.tp_grain_size to a multiple of 32" in refused.stdout + refused.stderr
    proc = run(train_cmd(2, tmp_path / "grain", *bat, "parallel.tp_grain_size=32"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(train_losses(tmp_path / "grain")) == [1, 2, 3]


def test_malformed_yaml_names_file_and_line(tmp_path):
    proc = run_cli(tmp_path, base_yaml() + "\nmiss: [unclosed\n")
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "line" in proc.stderr and "not valid YAML" in proc.stderr


def test_unknown_key_suggests_nearest(tmp_path):
    proc = run_cli(tmp_path, base_yaml().replace("  micro_batch_size:", "  micro_batch_sise:"))
    assert proc.returncode == 2
    assert "unknown key 'train.micro_batch_sise'" in proc.stderr and "did you mean 'train.micro_batch_size'" in proc.stderr


@pytest.mark.parametrize("override,expect", [
    ("train.lr=fast", "'train.lr' must be a number"),
    ("parallel.zero_stage=4", "'parallel.zero_stage' is 4; choose one of [0, 1, 2, 3]"),
    ("parallel.zero_stage=3", "all-gathers its resident parameters after every optimizer step"),
    ("miss.mode=lora", "'miss.mode' is 'lora'; choose one of ['miss', 'mini', 'bat']"),
    ("data.train_path=''", "data.train_path is empty: set it to a .jsonl/.parquet/.arrow file"),
    ("train.warmup_steps=500", "'train.warmup_steps' is 500"),
])
def test_bad_values_are_named(tmp_path, override, expect):
    proc = run_cli(tmp_path, base_yaml(), "--set", override)
    assert proc.returncode == 2
    assert expect in proc.stderr, proc.stderr


def test_bad_data_row_names_file_and_line(tmp_path):
    rows = (ROOT / "data/arith/train.jsonl").read_text().splitlines()[:50]
    rows[6] = '{"prompt": "2 + 2", "respose": "4"}'
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    proc = run([sys.executable, "launch/train.py", "--config", CONFIG, "--set", f"data.train_path={data}",
                "--set", "data.eval_path=null", "--set", f"output_dir={tmp_path / 'out'}"], timeout=300)
    assert proc.returncode != 0
    assert "rows.jsonl" in proc.stderr and "line 7" in proc.stderr, proc.stderr[-2000:]


def test_packed_mix_of_two_sources_trains(tmp_path):
    """pack: true over two sources in their own formats (one process), model.attn_implementation unset (the
    family's): the mix is reported at start, the loss falls, only real tokens are counted, the summary gives the
    padding fraction, and eval.samples shows rows of the first source's eval file."""
    sources = ("[{path: data/arith/train.jsonl, weight: 3, eval_path: data/arith/eval.jsonl}, "
               "{path: data/arith/train_chat.jsonl, format: chat, weight: 1}]")
    proc = run(train_cmd(1, tmp_path, "data.train_path=''", "data.eval_path=null", f"data.sources={sources}",
                         "data.pack=true", "model.attn_implementation=null", "data.seq_len=128",
                         "train.micro_batch_size=8", "train.max_steps=30",
                         "checkpoint.every_steps=0", "eval.every_steps=0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.jsonl (instruction, weight 3): 16500 of 20000; data/arith/train_chat.jsonl (chat, weight 1): " \
           "5500 of 2000" in proc.stderr
    losses = train_losses(tmp_path)
    assert sum(losses[s] for s in range(28, 31)) < 0.7 * sum(losses[s] for s in range(1, 4))
    assert "the model's answers to 3 rows of data/arith/eval.jsonl" in proc.stdout  # the first source with an eval file
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["padding_fraction"] < 0.15  # unpacked: over 0.6
    capacity = 30 * 8 * 128
    assert (1 - summary["padding_fraction"] - 0.02) * capacity < summary["tokens"] < capacity
    assert summary["eval_loss"] < losses[1]


def test_resume_on_another_layout_continues_the_uninterrupted_run(tmp_path, hf_base):
    """A checkpoint of 2 data-parallel ranks resumes on TP=2 x DP=2 and on one rank (accumulating 2 micro-batches):
    every later loss equals the uninterrupted 2-rank run's, with the same global batch of 16 sequences (D, its Adam
    state, the LR schedule and the data position all carry over)."""
    common = (f"model.path={hf_base}", "train.max_steps=8", "train.micro_batch_size=8", "checkpoint.every_steps=4",
              "checkpoint.keep_last=3", "eval.every_steps=0")
    straight = tmp_path / "straight"
    proc = run(train_cmd(2, straight, *common))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = train_losses(straight)
    for name, ranks, layout in (("tp2xdp2", 4, ["parallel.tp_size=2"]), ("one_rank", 1, ["train.grad_accum_steps=2"])):
        out = tmp_path / name
        shutil.copytree(straight / "checkpoints" / "step_00000004", out / "checkpoints" / "step_00000004")
        proc = run(train_cmd(ranks, out, *common, *layout, resume="auto"))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses = train_losses(out)
        assert sorted(losses) == [5, 6, 7, 8], name
        for step in losses:
            assert losses[step] == pytest.approx(reference[step], rel=1e-4), (name, step)


@pytest.mark.parametrize("max_batches,rows", [(0, 5), (1, 2)])
def test_eval_covers_the_same_rows_on_any_layout(tmp_path, max_batches, rows):
    """5 eval rows, micro-batches of 2 on 2 data-parallel ranks: the trainer's eval loss is the token-weighted loss
    of all 5 rows (rank 1's second micro-batch holds only filler rows, which take no loss), or with
    eval.max_batches=1 of the first 2 (not 2 per rank), as miss-ds-eval finds it independently on the final
    checkpoint."""
    five = tmp_path / "five.jsonl"
    five.write_text("".join((ROOT / "data/arith/eval.jsonl").read_text().splitlines(keepends=True)[:5]))
    out = tmp_path / "run"
    proc = run(train_cmd(2, out, f"data.eval_path={five}", "train.micro_batch_size=2", "train.max_steps=3",
                         "train.warmup_steps=1", "eval.every_steps=0", f"eval.max_batches={max_batches}",
                         "eval.samples=0", "checkpoint.every_steps=0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trained = json.loads((out / "summary.json").read_text())["eval_loss"]
    report = run([sys.executable, "-m", "miss_ds.cli.evaluate", "--checkpoint", str(out / "checkpoints/step_00000003"),
                  "--data", str(five), "--batch-size", "1", "--limit", str(rows)])
    assert report.returncode == 0, report.stderr[-3000:]
    reference = json.loads(report.stdout)
    assert reference["rows"] == rows and trained == pytest.approx(reference["loss"], rel=1e-5)


def test_eval_loss_per_source_is_each_sources_loss_as_miss_ds_eval_finds_it(tmp_path):
    """With data.sources, the trainer logs each source's eval loss (``loss/<name>``) beside the overall one: each equals
    miss-ds-eval's loss of that source's eval file on the final checkpoint (its "sets", in their formats),
    eval.max_batches=2 of micro-batch 1 taking the first 2 sequences of each source on 2 ranks, and the overall one
    is their token-weighted mean."""
    from miss_ds.train.metrics import read_metrics

    lines = (ROOT / "data/arith/eval.jsonl").read_text().splitlines(keepends=True)
    instruction = tmp_path / "eval.jsonl"
    instruction.write_text("".join(lines[:5]))
    chat = tmp_path / "chat_eval.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": row["prompt"]},
                                                     {"role": "assistant", "content": row["response"]}]}) + "\n"
                            for row in map(json.loads, lines[5:9])))
    sources = json.dumps([{"path": "data/arith/train.jsonl", "eval_path": str(instruction), "name": "arith"},
                          {"path": "data/arith/train_chat.jsonl", "eval_path": str(chat), "format": "chat"}])
    out = tmp_path / "run"
    proc = run(train_cmd(2, out, "data.train_path=''", "data.eval_path=null", f"data.sources={sources}",
                         "data.seq_len=128", "train.micro_batch_size=1", "train.max_steps=3", "train.warmup_steps=1",
                         "eval.every_steps=0", "eval.max_batches=2", "eval.samples=0", "checkpoint.every_steps=0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "eval"][-1]
    assert set(logged) == {"step", "split", "time", "loss", "loss/arith", "loss/source1"}, logged
    report = run([sys.executable, "-m", "miss_ds.cli.evaluate", "--checkpoint", str(out / "checkpoints/step_00000003"),
                  "--batch-size", "1", "--limit", "2"])
    assert report.returncode == 0, report.stderr[-3000:]
    sets = json.loads(report.stdout)["sets"]
    assert [(s["source"], s["data"], s["rows"]) for s in sets] == [("arith", str(instruction), 2),
                                                                    ("source1", str(chat), 2)]
    for figures in sets:
        assert logged[f"loss/{figures['source']}"] == pytest.approx(figures["loss"], rel=1e-5)
    tokens = [figures["loss_tokens"] for figures in sets]
    assert logged["loss"] == pytest.approx(
        sum(f["loss"] * n for f, n in zip(sets, tokens)) / sum(tokens), rel=1e-5)
    assert abs(logged["loss/arith"] - logged["loss/source1"]) > 1e-3  # two sets, not one loss twice


def test_progress_in_a_log_file_is_a_line_per_logged_step(tmp_path):
    """stderr that is not a terminal (a Slurm or mpirun log) gets one line per logged step, not tqdm's carriage
    returns (a single line of thousands of characters)."""
    proc = run(train_cmd(1, tmp_path, "logging.progress=true", "logging.every_steps=2", "train.max_steps=4",
                         "train.warmup_steps=1", "eval.every_steps=0", "eval.samples=0", "checkpoint.every_steps=0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr
    progress = [line.split(": ", 1)[1] for line in proc.stderr.splitlines() if "reporter: step " in line]
    assert [line.split(":")[0] for line in progress] == ["step 2/4", "step 4/4"], progress
