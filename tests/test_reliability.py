"""Reliability: crashes, preemption and bad input lose nothing and explain themselves (CPU, gloo).

* SIGKILL of both ranks and the launcher at seeded random points (one of them during a checkpoint save), then
  ``--resume auto`` until done: every ``step_*`` verifies, the newest is found, and the final D and every
  logged loss equal an uninterrupted run's.
* SIGTERM makes a rank save and exit 85; a TP=2 resume of that TP=1 checkpoint loads D and warns.
* Non-finite losses and gradients are skipped and counted; too many in a row stop training with the reason.
* Bad input (r, tokenizer, too little data, damaged or foreign checkpoints, a full disk) fails before training,
  naming the module, key, file or path; a refused resume writes nothing (the run's saved random base stays).
* Every reader of a checkpoint's adapter refuses a flipped byte; a finished run resumed changes no file; a resume that
  changes the LR schedule says so; summary.json's figures agree with each other and are strict JSON.
* ``MISS_DS_SOAK=1``: a few thousand steps with frequent checkpoints keep RSS and open fds flat (minutes).
* ``MISS_DS_KILLS`` (at most 4, default 3) and ``MISS_DS_KILL_SEED`` choose the kill points.

The in-process scenarios run in one subprocess, ``tests/dist/reliability_trainer.py`` (see its docstring).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from miss_ds.adapter_io import read_full_adapter
from miss_ds.atomic import CheckpointError, verify
from miss_ds.ds_compat import cpu_shm_segment
from miss_ds.run_config import ConfigError
from miss_ds.train.metrics import read_metrics
from tests.launch_utils import ROOT, free_port, result_of
from tests.test_train import QUICK, env, run, train_cmd, train_losses

SOAK = os.environ.get("MISS_DS_SOAK") == "1"


def step_dirs(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_*"))


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300, poll: float = 0.05) -> None:
    """Poll ``condition()`` until true; fail if ``proc`` exits first or the timeout passes."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def last_train_step(out: Path) -> int:
    return max((r["step"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"), default=0)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once, as a node failure would (no-op once it ended)."""
    try:
        root = psutil.Process(proc.pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


def release_shm(port: int | str) -> None:
    """Unlink the /dev/shm segments (69 MB of RAM per rank) that DeepSpeed's CPU all-reduce leaves behind for
    the job that used ``port``: without the trainer fix every CPU run, finished or killed, leaks them."""
    pattern = cpu_shm_segment("*", port, "*")
    for segment in pattern.parent.glob(pattern.name):
        segment.unlink(missing_ok=True)


def port_of(cmd: list[str]) -> str:
    return cmd[cmd.index("--master_port") + 1]


def launch(cmd: list[str], log: Path, port: int | None = None) -> subprocess.Popen:
    """Start ``cmd`` with output to ``log``; ``port``: the MASTER_PORT of a one-process run (release_shm needs it)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env={**env(), **({"MASTER_PORT": str(port)} if port else {})},
                                stdout=f, stderr=subprocess.STDOUT, text=True)


def run_2ranks(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return run(cmd)
    finally:
        release_shm(port_of(cmd))


# ---------------------------------------------------------------------------------- kill -9 and resume
KILL_SEED = int(os.environ.get("MISS_DS_KILL_SEED", "20261123"))
KILL_COUNT = int(os.environ.get("MISS_DS_KILLS", "3"))
KILL_STEPS = 24
KILL_RUN = (f"train.max_steps={KILL_STEPS}", "checkpoint.every_steps=3", "checkpoint.keep_last=2",
            "eval.every_steps=0")


def kill_plan(seed: int, count: int) -> list[tuple[str, int]]:
    """``count`` kill points (kind, step) after the first checkpoint (step 3), steps at least 3 apart so that a
    resumed run's stale metrics lines never reach the next point: one 'save' kill (as soon as the next
    checkpoint save has created its temp dir), the others 'step' kills (a random moment after that step is
    logged). A crash before any checkpoint is a scenario of its own (test_restart_without_a_checkpoint_...)."""
    slots = range(4, KILL_STEPS - 4, 5)
    if count > len(slots):
        raise ValueError(f"MISS_DS_KILLS={count}: at most {len(slots)} kill points fit in a {KILL_STEPS}-step run; "
                         "run more seeds (MISS_DS_KILL_SEED) instead")
    rng = random.Random(seed)
    steps = [s + rng.randrange(3) for s in sorted(rng.sample(slots, count))]
    during_save = rng.randrange(count)
    return [("save" if i == during_save else "step", s) for i, s in enumerate(steps)]


def run_segment(launcher: subprocess.Popen, kill: tuple[str, int] | None, out: Path, rng: random.Random):
    """Let the run reach ``kill`` = (kind, step) and SIGKILL everything, or run to the end (``kill`` None).
    Returns the kind of kill, or None."""
    if kill is None:
        launcher.wait(timeout=600)
        return None
    kind, step = kill
    wait_for(lambda: last_train_step(out) >= step, launcher, f"step {step}")
    if kind == "save":
        wait_for(lambda: any((out / "checkpoints").glob(".tmp-step_*")), launcher, "a save", poll=0.002)
    else:
        time.sleep(rng.uniform(0.0, 0.3))
    kill_tree(launcher)
    return kind


def test_sigkill_at_random_points_then_resume_auto_loses_nothing(tmp_path):
    """Every kill leaves only complete checkpoints; ``--resume auto`` picks the newest, and the finished run's
    D and per-step losses equal those of a run that was never interrupted."""
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    proc = run_2ranks(train_cmd(2, reference, *KILL_RUN))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rng = random.Random(KILL_SEED + 1)
    plan = kill_plan(KILL_SEED, KILL_COUNT)
    resume_from: int | None = None
    history = []
    for segment in range(len(plan) + 1):
        cmd = train_cmd(2, broken, *KILL_RUN, resume="auto" if segment else None)
        log = tmp_path / f"segment{segment}.log"
        launcher = launch(cmd, log)
        try:
            ended = run_segment(launcher, plan[segment] if segment < len(plan) else None, broken, rng)
        finally:
            kill_tree(launcher)
            release_shm(port_of(cmd))
        output = log.read_text()
        if ended is None:
            assert launcher.returncode == 0, output[-3000:]
        mid_save = sorted(p.name for p in (broken / "checkpoints").glob(".tmp-step_*"))
        if ended == "save":
            assert mid_save, "the kill was meant to land inside a checkpoint save"
        if segment and resume_from is None:
            assert "resumed from" not in output, output[-3000:]
        elif segment:  # (b) the newest complete checkpoint was found and used
            assert f"step_{resume_from:08d} at step {resume_from}" in output, output[-3000:]
        for path in step_dirs(broken):  # (a) nothing named step_* is ever incomplete
            verify(path, full=True)
        if segment < len(plan):
            resume_from = step_of(step_dirs(broken)[-1]) if step_dirs(broken) else None
            history.append((*plan[segment], last_train_step(broken), mid_save, resume_from))
    print(f"\n{len(plan)} kills (kind, planned step, last logged step, temp dirs left, resumed from): {history}")

    final = f"checkpoints/step_{KILL_STEPS:08d}/adapter"
    _, want = read_full_adapter(reference / final)
    _, got = read_full_adapter(broken / final)
    assert sorted(got) == sorted(want)
    for key in want:  # (c)
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    steps = [r["step"] for r in read_metrics(broken / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, KILL_STEPS + 1)), "metrics.jsonl must hold each step once, in order"
    expected, losses = train_losses(reference), train_losses(broken)
    assert sorted(losses) == sorted(expected) == list(range(1, KILL_STEPS + 1))
    for step, loss in expected.items():  # (d)
        assert losses[step] == pytest.approx(loss, rel=1e-6, abs=1e-6), f"step {step}, kills {history}"


# ---------------------------------------------------------------------------------- SIGTERM and another TP size
SIGTERM_RUN = ("train.max_steps=20", "eval.every_steps=0", "checkpoint.every_steps=0")
#: What launch/train.py prints once SIGTERM/SIGUSR1 no longer kill it.
HANDLER_INSTALLED = "preemption handler installed"


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory, hf_base) -> tuple[Path, int, str]:
    """A one-process TP=1 run on ``hf_base`` sent SIGTERM after step 6: (output dir, return code, output)."""
    out, port = tmp_path_factory.mktemp("sigterm") / "run", free_port()
    proc = launch(train_cmd(1, out, *SIGTERM_RUN, f"model.path={hf_base}"), out.parent / "run.log", port)
    try:
        wait_for(lambda: last_train_step(out) >= 6, proc, "step 6", poll=0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        kill_tree(proc)
        release_shm(port)
    return out, proc.returncode, (out.parent / "run.log").read_text()


def test_sigterm_saves_a_checkpoint_and_exits_85(sigterm_run):
    """Slurm and Kubernetes preempt with SIGTERM: the step ends, a complete checkpoint is saved, exit code 85."""
    out, returncode, output = sigterm_run
    assert returncode == 85, output[-3000:]
    saved = step_dirs(out)
    assert len(saved) == 1, saved
    stopped_at = step_of(saved[0])
    assert 6 <= stopped_at < 20
    assert verify(saved[0], full=True)["metadata"]["step"] == stopped_at
    assert f"SIGTERM received, checkpoint saved at step {stopped_at}; exiting with 85" in output


def test_ctrl_c_saves_a_checkpoint_once_and_stops_at_once_the_second_time(tmp_path):
    """Ctrl-C killed the run with a KeyboardInterrupt and saved nothing (a run without checkpoint.every_steps lost
    everything): the first one now saves at the step's end and exits 85, as a preemption notice does; a second one is
    Python's KeyboardInterrupt (checked on the handler: a process cannot be signalled twice at a chosen point)."""
    from miss_ds.train.preemption import Preemption

    port = free_port()
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = launch(train_cmd(1, out, *SIGTERM_RUN), log, port)
    try:
        wait_for(lambda: last_train_step(out) >= 2, proc, "step 2", poll=0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 85, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
        release_shm(port)
    output = log.read_text()
    saved = step_dirs(out)
    assert len(saved) == 1 and 2 <= step_of(saved[0]) < 20, saved
    assert f"SIGINT received, checkpoint saved at step {step_of(saved[0])}; exiting with 85" in output, output[-3000:]
    assert "Ctrl-C again stops at once" in output and "KeyboardInterrupt" not in output
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        handler = Preemption().install()
        signal.raise_signal(signal.SIGINT)
        assert handler.requested and handler.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)


def test_sigterm_right_after_start_still_exits_85(tmp_path):
    """A notice during start-up must not kill the job either: it saves after its first step and exits 85."""
    port = free_port()
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = launch(train_cmd(1, out, "train.max_steps=4", "train.warmup_steps=0", "checkpoint.every_steps=0"), log, port)
    try:
        wait_for(lambda: HANDLER_INSTALLED in log.read_text(), proc, "the preemption handler", poll=0.01)
        assert not (out / "metrics.jsonl").exists(), "the signal must come during start-up, before any step"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 85, (tmp_path / "run.log").read_text()[-3000:]
        assert [step_of(p) for p in step_dirs(out)] == [1]
    finally:
        kill_tree(proc)
        release_shm(port)


def test_tp2_resume_of_a_tp1_checkpoint_continues_as_tp1_would(sigterm_run, hf_base, scenarios, tmp_path):
    """Another TP size takes over D, its fp32 masters and Adam state and the LR schedule: every later loss of the TP=2
    continuation equals that of a TP=1 run that was never stopped (same base, batches; dp=1 both)."""
    source, returncode, _ = sigterm_run
    assert returncode == 85
    out = shutil.copytree(source, tmp_path / "run")
    stopped_at = step_of(step_dirs(out)[0])
    proc = run_2ranks(train_cmd(2, out, *SIGTERM_RUN, "parallel.tp_size=2", f"model.path={hf_base}", resume="auto"))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert f"step_{stopped_at:08d} at step {stopped_at} (written by tp_size=1 on 1 ranks)" in output
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 21))
    assert scenarios["tp1_straight"]["error"] is None
    tp1 = train_losses(scenarios["root"] / "tp1_straight")
    for step in range(stopped_at + 1, 21):
        assert losses[step] == pytest.approx(tp1[step], rel=1e-3), step  # fp32 sums in another order


def test_tp_change_on_a_random_base_is_refused(sigterm_run, tmp_path):
    """A random base is drawn per TP shard, so under another tp_size it is another model and D, loaded onto it
    silently, is meaningless: a resume that changes tp_size and draws a random base must refuse and say why.
    (Without the refusal the run stops one step later.)"""
    out = shutil.copytree(sigterm_run[0], tmp_path / "run")
    stopped_at = step_of(step_dirs(out)[0])
    proc = run_2ranks(train_cmd(2, out, *SIGTERM_RUN, f"train.max_steps={stopped_at + 1}", "parallel.tp_size=2",
                                "model.path=null", resume="auto"))
    assert proc.returncode != 0
    assert "(written with tp_size=1) with parallel.tp_size=2: this config draws random base weights" in proc.stderr
    assert "Resume with parallel.tp_size=1, or load the base from a checkpoint" in proc.stderr


# ---------------------------------------------------------------------------------- in-process scenarios
COMMON = ["train.warmup_steps=1", "eval.every_steps=0", "eval.max_batches=1", "logging.every_steps=1",
          "checkpoint.every_steps=0"]
#: Adam's second moments in a checkpoint (see miss_ds.train.checkpoint), found by pattern.
OPTIM_FILE = "optimizer/exp_avg_sq/*.safetensors"
STEP4 = "checkpoints/step_00000004"
TMPFS_SIZE = "2560k"  # one checkpoint of the tiny model (1.6 MiB) fits, a second does not


def _mount_tmpfs(directory: Path) -> bool:
    directory.mkdir(parents=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(directory)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, sigterm_run, hf_base) -> dict:
    """Outcomes of every in-process scenario (one subprocess); keys: scenario names, plus 'root'."""
    root = tmp_path_factory.mktemp("scenarios")
    base, step4 = root / "base", STEP4

    def job(name: str, *overrides: str, **extra) -> dict:
        return {"name": name, "overrides": [*COMMON, f"output_dir={root / name}", *overrides], **extra}

    def resume(checkpoint: str, name: str, *overrides: str, **damage: str) -> dict:
        """Resume in a copy of the base run (``checkpoint``: 'auto' or a path in it), the one file of step 4 that
        a pattern matches damaged."""
        copy = root / f"resume_{name}"
        return job(copy.name, "train.max_steps=5", *overrides, copy=[str(base), str(copy)],
                   resume=checkpoint if checkpoint == "auto" else str(copy / checkpoint),
                   **{how: str(copy / step4 / file) for how, file in damage.items()})

    tokenizer = shutil.copytree(ROOT / "data/arith/tokenizer", root / "tokenizer_without_template")
    (tokenizer / "chat_template.jinja").unlink()
    rows = (ROOT / "data/arith/train.jsonl").read_text().splitlines(keepends=True)
    (root / "ten.jsonl").write_text("".join(rows[:10]))
    nan_run = ("train.max_steps=6", "train.max_bad_steps=3")
    jobs = [
        job("base", "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3"),
        *(job(f"nan_{what}_zero{zero}", *nan_run, f"parallel.zero_stage={zero}", **{f"nan_{what}": [2, 5, 6]})
          for zero in (0, 1) for what in ("loss", "grad")),
        job("nan_loss_in_a_row", *nan_run, nan_loss=[3, 4, 5]),
        # Accumulating 2 micro-batches: forward calls 3 and 4 are window 2's first and second micro-batch.
        job("nan_loss_first_in_window", *nan_run, "train.grad_accum_steps=2", nan_loss=[3]),
        job("nan_grad_second_in_window", *nan_run, "train.grad_accum_steps=2", nan_grad=[4]),
        *(job(f"nan_grad_in_a_row_zero{zero}", *nan_run, f"parallel.zero_stage={zero}", nan_grad=[3, 4, 5])
          for zero in (0, 1)),
        job("r_too_large", "miss.r=256"),
        job("chat_without_template", f"tokenizer={tokenizer}", "data.format=chat",
            "data.train_path=data/arith/train_chat.jsonl", "data.eval_path=null"),
        job("train_smaller_than_a_batch", f"data.train_path={root / 'ten.jsonl'}", "data.eval_path=null"),
        resume(step4, "truncated", truncate=OPTIM_FILE),
        resume(step4, "flipped", flip=OPTIM_FILE),
        resume("auto", "auto_flipped", flip=OPTIM_FILE),
        resume("auto", "other_base", "model.config.hidden_size=64"),
        resume("auto", "other_seed", "seed=1"),
        job("init_adapter_other_base", f"init_adapter={base / step4}", "model.config.hidden_size=64"),
        job("init_adapter_other_seed", f"init_adapter={base / step4}", "seed=1", "train.max_steps=2"),
        job("restart_without_checkpoint", "train.max_steps=2", resume="auto", stale_metrics=3),
        {"name": "tp1_straight", "overrides": [*QUICK, f"output_dir={root / 'tp1_straight'}", *SIGTERM_RUN,
                                               f"model.path={hf_base}"]},
    ]
    mounted = _mount_tmpfs(root / "disk_full" / "checkpoints")
    if mounted:
        jobs.append(job("disk_full", "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=3"))
    port = free_port()
    try:
        proc = subprocess.run([sys.executable, "tests/dist/reliability_trainer.py", "--scenarios", json.dumps(jobs)],
                              cwd=ROOT, env={**env(), "MASTER_PORT": str(port)}, capture_output=True, text=True,
                              timeout=900)
        results = result_of(proc)
        if mounted:  # look before the tmpfs goes
            results["disk_full"]["left"] = {p.name: _verifies(p) for p in (root / "disk_full/checkpoints").iterdir()}
    finally:
        release_shm(port)
        if mounted:
            subprocess.run(["umount", str(root / "disk_full" / "checkpoints")], check=False)
    assert results["base"]["error"] is None, results["base"]
    return {**results, "root": root}


def optim_file(checkpoint: Path) -> str:
    """The path, relative to ``checkpoint``, of its one file matching OPTIM_FILE."""
    matches = list(checkpoint.glob(OPTIM_FILE))
    assert len(matches) == 1, f"{checkpoint}: {len(matches)} files match {OPTIM_FILE}: {matches}"
    return matches[0].relative_to(checkpoint).as_posix()


def _verifies(path: Path) -> bool:
    try:
        verify(path, full=True)
        return True
    except Exception:  # noqa: BLE001
        return False


def test_non_finite_losses_are_skipped_and_counted(scenarios):
    """NaN losses on micro-batches 2, 5 and 6 (two in a row, below max_bad_steps=3): training finishes, D stays
    finite, and skipped_batches counts 3 in metrics.jsonl and summary.json."""
    outcome, out = scenarios["nan_loss_zero1"], scenarios["root"] / "nan_loss_zero1"
    assert outcome["error"] is None and outcome["step"] == 6 and outcome["d_finite"]
    assert json.loads((out / "summary.json").read_text())["skipped_batches"] == 3
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_batches"] for r in rows] == [0, 1, 1, 3, 3, 3]
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reaches the logged mean
    assert sum("non-finite loss" in w for w in outcome["log"]) == 3


@pytest.mark.parametrize("zero", [0, 1])
def test_non_finite_gradients_skip_the_step_like_a_non_finite_loss(scenarios, zero):
    """A finite loss with NaN gradients must not reach D (ZeRO-0: torch AdamW would apply it) nor pass silently
    (ZeRO-1: DeepSpeed skips the step but nobody counted it): the step is skipped and counted, and the run is
    step for step the run whose loss was NaN on the same micro-batches."""
    root = scenarios["root"]
    grads, losses = scenarios[f"nan_grad_zero{zero}"], scenarios[f"nan_loss_zero{zero}"]
    assert grads["error"] is None, grads
    assert grads["d_finite"] and grads["step"] == 6
    assert json.loads((root / f"nan_grad_zero{zero}" / "summary.json").read_text())["skipped_batches"] == 3
    assert sum("non-finite gradients" in w for w in grads["log"]) == 3, grads["log"]
    assert losses["error"] is None
    want, got = train_losses(root / f"nan_loss_zero{zero}"), train_losses(root / f"nan_grad_zero{zero}")
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step


def test_a_non_finite_value_inside_an_accumulation_window_drops_that_window(scenarios):
    """With 2 accumulation steps, a NaN loss in window 2's first micro-batch and NaN gradients from its second one
    both skip that optimizer step and drop the window: the two runs are step for step the same, one window skipped,
    D finite, and their losses finite."""
    root = scenarios["root"]
    loss, grad = scenarios["nan_loss_first_in_window"], scenarios["nan_grad_second_in_window"]
    for outcome in (loss, grad):
        assert outcome["error"] is None and outcome["d_finite"] and outcome["step"] == 6, outcome
    for name in ("nan_loss_first_in_window", "nan_grad_second_in_window"):
        assert json.loads((root / name / "summary.json").read_text())["skipped_batches"] == 1
    want, got = train_losses(root / "nan_loss_first_in_window"), train_losses(root / "nan_grad_second_in_window")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
        assert want[step] == want[step]  # finite: no NaN reaches a logged loss


def test_max_bad_steps_in_a_row_stop_training_with_the_reason(scenarios):
    """Three NaN losses in a row (train.max_bad_steps=3) stop the run, saying how many, where and what to do."""
    outcome = scenarios["nan_loss_in_a_row"]
    assert outcome["error_type"] == "TrainingStopped"
    assert outcome["step"] == 2
    assert "3 steps in a row" in outcome["error"] and "train.max_bad_steps=3" in outcome["error"]
    assert "at step 3" in outcome["error"] and "non-finite loss" in outcome["error"]


@pytest.mark.parametrize("zero", [0, 1])
def test_non_finite_gradients_in_a_row_stop_training(scenarios, zero):
    """Gradients that stay non-finite are as fatal as such losses: stop, with D still finite."""
    outcome = scenarios[f"nan_grad_in_a_row_zero{zero}"]
    assert outcome["error_type"] == "TrainingStopped", outcome
    assert outcome["d_finite"] and outcome["step"] == 2
    assert "train.max_bad_steps=3" in outcome["error"] and "gradients" in outcome["error"]


def test_r_larger_than_a_layer_names_the_module(scenarios):
    """miss.r=256 > in_features=128: refused before training, naming the module and an r that fits."""
    outcome = scenarios["r_too_large"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None
    assert "miss.r=256" in outcome["error"] and "'model.layers.0.self_attn.q_proj'" in outcome["error"]
    assert "use r <= 128" in outcome["error"]


def test_chat_format_with_a_tokenizer_without_template_names_the_tokenizer(scenarios):
    """data.format=chat with a tokenizer directory lacking chat_template.jinja: the key and the directory named."""
    outcome = scenarios["chat_without_template"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None
    assert 'data.format is "chat"' in outcome["error"] and "no chat_template" in outcome["error"]
    assert "tokenizer_without_template" in outcome["error"]


def test_train_data_that_cannot_fill_one_batch_fails_before_training(scenarios):
    """The train split must fill one global batch, checked before the first step (the eval split need not:
    ``eval_batches`` fills its last micro-batches)."""
    outcome = scenarios["train_smaller_than_a_batch"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None, outcome
    assert "data.train_path=" in outcome["error"] and "ten.jsonl" in outcome["error"]
    assert "train.micro_batch_size=16 x train.grad_accum_steps=1" in outcome["error"]
    assert not (scenarios["root"] / "train_smaller_than_a_batch").exists()


def test_resume_from_a_truncated_checkpoint_names_the_file(scenarios):
    """``--resume PATH`` of a checkpoint with a truncated shard: refused, naming the file and what else to resume."""
    outcome = scenarios["resume_truncated"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None
    damaged = optim_file(scenarios["root"] / "resume_truncated" / STEP4)
    assert f"'{damaged}' has" in outcome["error"] and "truncated" in outcome["error"]
    assert "step_00000002" in outcome["error"]  # the hint lists what can be resumed instead


def test_resume_from_a_same_size_corruption_names_the_file(scenarios):
    """A flipped byte keeps the size, so only the manifest's sha256 catches it; checking sizes alone, the resume
    loads the corrupt optimizer state silently."""
    outcome = scenarios["resume_flipped"]
    assert outcome["error_type"] == "ConfigError", outcome
    damaged = optim_file(scenarios["root"] / "resume_flipped" / STEP4)
    assert f"'{damaged}' does not match its sha256" in outcome["error"]


def test_resume_auto_skips_a_corrupt_newest_checkpoint(scenarios):
    """``--resume auto`` with a corrupt newest checkpoint: it is skipped with a warning, the older one used."""
    outcome = scenarios["resume_auto_flipped"]
    assert outcome["error"] is None and outcome["step"] == 5, outcome
    assert any("skipping checkpoint" in w and "step_00000004" in w and "sha256" in w for w in outcome["log"])
    assert any("resumed from" in w and "step_00000002 at step 2" in w for w in outcome["log"])


def test_resume_with_another_base_model_is_refused(scenarios):
    """A checkpoint of a hidden_size=128 random base resumed on a hidden_size=64 one: refused by name from the recorded
    config, before the model is built, not by shapes."""
    outcome = scenarios["resume_other_base"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None, outcome
    assert "step_00000004" in outcome["error"] and "draws another base" in outcome["error"]
    assert "model.config.hidden_size: checkpoint 128, this config 64" in outcome["error"]
    assert "--set model.config.hidden_size=128" in outcome["error"]


def test_init_adapter_from_another_base_model_is_refused(scenarios):
    """``init_adapter`` of a checkpoint of another base: refused as bad input (ConfigError: one line, exit 2),
    naming the adapter and the differing field."""
    outcome = scenarios["init_adapter_other_base"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None, outcome
    assert "step_00000004/adapter was trained on another base model" in outcome["error"]
    assert "hidden_size: adapter 128 vs model 64" in outcome["error"]


def test_resume_on_another_random_base_of_the_same_shape_is_refused(scenarios):
    """seed=1 draws another random base of the same shape: refused by name from the recorded config, before the model
    is built, and the base the run saved is left as it was (nothing moved aside)."""
    outcome = scenarios["resume_other_seed"]
    assert outcome["error_type"] == "ConfigError" and outcome["step"] is None, outcome
    assert "step_00000004: its base has random weights" in outcome["error"]
    assert "seed: checkpoint 0, this config 1" in outcome["error"] and "--set seed=0" in outcome["error"]
    run = scenarios["root"] / "resume_other_seed"
    assert not list(run.glob("base.replaced-*"))
    assert tree_digest(run / "base") == tree_digest(scenarios["root"] / "base" / "base")


def test_init_adapter_from_another_random_base_is_warned_about(scenarios):
    """Starting from an adapter of another base can be meant: the run warns, naming the adapter, and trains."""
    outcome = scenarios["init_adapter_other_seed"]
    assert outcome["error"] is None and outcome["step"] == 2, outcome
    assert any("step_00000004/adapter was trained on another base than this run's base" in w for w in outcome["log"])


def test_a_random_base_is_saved_and_is_what_the_adapters_were_trained_on(scenarios, tmp_path):
    """The run saved its random base in <output_dir>/base and its adapters name it: the merge finds it alone and the
    base fingerprint the live model recorded matches the saved weights (merge_to_hf checks it)."""
    from transformers import AutoModelForCausalLM

    from miss_ds.adapter_io import read_adapter_config
    from miss_ds.convert.merge import merge_to_hf

    run = scenarios["root"] / "base"
    assert read_adapter_config(run / STEP4 / "adapter")["base_model"]["name_or_path"] == str(run / "base")
    merge_to_hf(run / STEP4, None, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert model.config.use_cache and (tmp_path / "merged" / "tokenizer.json").is_file()


def test_disk_full_during_a_save_says_so_and_keeps_earlier_checkpoints(scenarios):
    """checkpoints/ is a 2.5 MiB tmpfs: the step-2 save fits, the step-4 save runs out of space."""
    if "disk_full" not in scenarios:
        pytest.skip("needs root to mount a tmpfs")
    outcome = scenarios["disk_full"]
    assert outcome["error_type"] == "DiskFullError", outcome
    assert "disk full while saving checkpoint step 4" in outcome["error"]
    assert str(scenarios["root"] / "disk_full/checkpoints/.tmp-step_00000004") in outcome["error"]
    assert "earlier checkpoints are intact" in outcome["error"]
    assert outcome["left"] == {"step_00000002": True}


def test_restart_without_a_checkpoint_drops_the_stale_metrics(scenarios):
    """A run killed before its first checkpoint left steps 1-3 in metrics.jsonl; the restart (``--resume auto``
    finds nothing) must not append to them, or every step appears twice and the loss plot mixes both runs."""
    outcome = scenarios["restart_without_checkpoint"]
    assert outcome["error"] is None and outcome["step"] == 2
    rows = [r for r in read_metrics(scenarios["root"] / "restart_without_checkpoint/metrics.jsonl")
            if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] < 99 for r in rows)


def test_cpu_all_reduce_segment_does_not_outlive_the_run(scenarios):
    """Once the trainer is built every rank has mapped every segment, so the names must be gone: the memory
    then goes with the processes, even after kill -9."""
    assert scenarios["base"]["shm_left"] is False


# ---------------------------------------------------------------------------------- resume and readers, end to end
#: The default job for 4 steps, checkpoints at steps 2 and 4, in one process (about 10 s).
SMALL = ("train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3", "eval.every_steps=0",
         "eval.max_batches=1", "eval.samples=0", "train.warmup_steps=1", "logging.tensorboard=false")
STEP2, ADAPTER_FILE = "checkpoints/step_00000002", "adapter/tp00-of-01.safetensors"


def tree_digest(directory: Path) -> dict[str, str]:
    """The sha256 of every file under ``directory``, by relative path."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def flip(file: Path) -> None:
    """Invert one byte in the middle of ``file``: same size, another sha256."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def train_1rank(out: Path, *overrides: str, resume: str | None = None) -> subprocess.CompletedProcess:
    """launch/train.py in one process: the SMALL job with ``overrides``."""
    port = free_port()
    try:
        return subprocess.run(train_cmd(1, out, *SMALL, *overrides, resume=resume), cwd=ROOT, timeout=600,
                              env={**env(), "MASTER_PORT": str(port)}, capture_output=True, text=True)
    finally:
        release_shm(port)


def refusal(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a run refused as bad input: exit 2, no traceback."""
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def strict_json(path: Path) -> dict:
    """``path`` parsed as JSON proper: NaN and Infinity, which Python writes by default, are refused."""
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def cosine_rate(step: int, max_steps: int, lr: float = 1e-2, warmup: int = 1, floor: float = 0.1) -> float:
    """The SMALL job's rate after ``step`` scheduler steps (past warm-up), written out."""
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """The SMALL job's output directory (random base in base/, checkpoints of steps 2 and 4); copy it to change it."""
    out = tmp_path_factory.mktemp("small") / "run"
    proc = train_1rank(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _readers() -> dict:
    """Every reader of a training checkpoint's adapter: (read it, the error a corrupt one raises)."""
    from miss_ds.convert.init_adapter import check_init_adapter, load_init_adapter
    from miss_ds.convert.merge import merge_to_hf
    from miss_ds.convert.peft import write_peft_adapter
    from miss_ds.convert.reshard import reshard_adapter
    from miss_ds.infer.source import resolve

    return {"merge": (lambda ckpt, out: merge_to_hf(ckpt, None, out), CheckpointError),
            "peft": (lambda ckpt, out: write_peft_adapter(ckpt, out), CheckpointError),
            "reshard": (lambda ckpt, out: reshard_adapter(ckpt, 1, out), CheckpointError),
            "eval_and_generate": (lambda ckpt, out: resolve(checkpoint=str(ckpt)), CheckpointError),
            "init_adapter_check": (lambda ckpt, out: check_init_adapter(ckpt), ConfigError),
            "init_adapter_load": (lambda ckpt, out: load_init_adapter(torch.nn.Module(), ckpt), CheckpointError)}


@pytest.mark.parametrize("reader", ["merge", "peft", "reshard", "eval_and_generate", "init_adapter_check",
                                    "init_adapter_load"])
@pytest.mark.parametrize("given", ["checkpoint", "adapter_dir"])
def test_every_reader_refuses_an_adapter_with_a_flipped_byte(small_run, tmp_path, reader, given):
    """A flipped byte keeps the file's size: checking sizes alone, eval read such an adapter and reported a loss of 403
    without a word. Every reader must check the sha256 and refuse, naming the file, before writing anything; an
    intact checkpoint reads."""
    read, error = _readers()[reader]
    checkpoint = shutil.copytree(small_run / STEP2, tmp_path / "step_00000002")
    source = checkpoint if given == "checkpoint" else checkpoint / "adapter"
    if reader != "init_adapter_load":  # a bare module has no base to load D into
        read(source, tmp_path / "intact")
    flip(checkpoint / ADAPTER_FILE)
    with pytest.raises(error, match=re.escape(f"{checkpoint} is corrupt: file '{ADAPTER_FILE}' does not match")):
        read(source, tmp_path / "corrupt")
    assert not (tmp_path / "corrupt").exists()


def test_init_adapter_with_a_flipped_byte_is_refused_before_training(small_run, tmp_path):
    checkpoint = shutil.copytree(small_run / STEP2, tmp_path / "step_00000002")
    flip(checkpoint / ADAPTER_FILE)
    line = refusal(train_1rank(tmp_path / "run", f"init_adapter={checkpoint}"))
    assert f"init_adapter={checkpoint}:" in line and f"'{ADAPTER_FILE}' does not match its sha256" in line
    assert not (tmp_path / "run" / "base").exists()


@pytest.mark.parametrize("change, named", [
    ("seed=1", "seed: checkpoint 0, this config 1"),
    ("model.config.num_hidden_layers=3", "model.config.num_hidden_layers: checkpoint 2, this config 3")])
def test_a_resume_that_changes_the_random_base_is_refused_and_writes_nothing(small_run, tmp_path, change, named):
    """Another seed or model draws another random base. The resume used to write that base into <output_dir>/base
    first (moving the run's own aside, which its checkpoints need) and then fail with a traceback: it must refuse in
    one line, naming what differs and how to resume, and leave every file as it was."""
    run = shutil.copytree(small_run, tmp_path / "run")
    before = tree_digest(run)
    line = refusal(train_1rank(run, change, "train.max_steps=6", resume="auto"))
    assert f"cannot resume {run / 'checkpoints/step_00000004'}: its base has random weights" in line
    assert named in line and "--set " + change.split("=")[0] in line
    assert tree_digest(run) == before and not list(tmp_path.glob("run/base.replaced-*"))


def test_resume_on_another_base_checkpoint_is_a_one_line_refusal(sigterm_run, tmp_path):
    """A real base is read from model.path, which the recorded config cannot vouch for: the base fingerprint the
    checkpoint recorded refuses another base of the same shape, in one line, with nothing written."""
    from transformers import AutoConfig, LlamaForCausalLM

    source = sigterm_run[0]
    recorded = json.loads((step_dirs(source)[0] / "adapter" / "adapter_config.json").read_text())
    torch.manual_seed(1)
    other = tmp_path / "other_base"
    LlamaForCausalLM(AutoConfig.from_pretrained(recorded["base_model"]["name_or_path"])).save_pretrained(other)
    run = shutil.copytree(source, tmp_path / "run")
    before = tree_digest(run)
    line = refusal(train_1rank(run, "train.max_steps=20", f"model.path={other}", resume="auto"))
    assert f"cannot resume: {step_dirs(run)[0]} was trained on another base than this run's base" in line
    assert "Resume with the base and model settings of the run that wrote it" in line
    assert tree_digest(run) == before


def test_a_resuming_run_never_replaces_the_random_base_it_saved(tmp_path):
    """The last guard, for a base/ that the recorded config cannot tell apart (replaced by hand, another version):
    a resuming run refuses a base/ that is not the base it draws, and writes nothing; a new run moves it aside."""
    from miss_ds import MissConfig, apply_miss
    from miss_ds.distributed import ParallelLayout
    from miss_ds.loading import build_model_on_meta, materialize_random
    from miss_ds.random_base import save_random_base
    from tests.conftest import tiny_llama_config

    def drawn(seed: int) -> torch.nn.Module:
        model = build_model_on_meta(tiny_llama_config(), torch.float32)
        apply_miss(model, MissConfig(r=8))
        materialize_random(model, "cpu", torch.float32, seed=seed)
        return model

    layout = ParallelLayout(0, 1, 1)
    save_random_base(drawn(0), tmp_path, None, layout)
    saved = tree_digest(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'base'} holds another random base than this run")):
        save_random_base(drawn(1), tmp_path, None, layout, resuming=True)
    assert tree_digest(tmp_path) == saved
    save_random_base(drawn(0), tmp_path, None, layout, resuming=True)  # its own base: found, nothing written
    assert tree_digest(tmp_path) == saved
    save_random_base(drawn(1), tmp_path, None, layout)
    aside = list(tmp_path.glob("base.replaced-*"))
    assert len(aside) == 1 and tree_digest(aside[0]) == {k.removeprefix("base/"): v for k, v in saved.items()}


def _damage(checkpoints: Path, how: str) -> tuple[Path, str, str]:
    """Damage step 4 of ``checkpoints`` (or name a missing one): (the path to resume, what the error says, the
    complete checkpoints it must list)."""
    step4 = checkpoints / "step_00000004"
    if how == "missing":
        return checkpoints / "step_00000099", "not found", "step_00000002, step_00000004"
    if how == "truncated":
        file = next(step4.glob("optimizer/exp_avg_sq/*.safetensors"))
        os.truncate(file, file.stat().st_size // 2)
        return step4, "(truncated or overwritten)", "step_00000002"
    if how == "flipped":
        flip(step4 / ADAPTER_FILE)
        return step4, f"'{ADAPTER_FILE}' does not match its sha256", "step_00000002"
    (step4 / "trainer_state.json").unlink()
    return step4, "'trainer_state.json'", "step_00000002"


@pytest.mark.parametrize("how", ["missing", "truncated", "flipped", "deleted"])
def test_resume_of_a_bad_checkpoint_path_is_a_one_line_refusal(small_run, tmp_path, how):
    """``--resume PATH`` of a checkpoint that is missing, truncated, corrupt or lacks a file: one ``error:`` line
    (exit 2) naming the path and the complete checkpoints beside it (not a corrupt one, nor those of the new run's
    output_dir), and nothing of the new run written."""
    other = shutil.copytree(small_run, tmp_path / "other")
    path, problem, complete = _damage(other / "checkpoints", how)
    line = refusal(train_1rank(tmp_path / "new", resume=str(path)))
    assert str(path) in line and problem in line, line
    assert f"(complete checkpoints in {other / 'checkpoints'}: {complete})." in line
    assert not (tmp_path / "new" / "base").exists() and not (tmp_path / "new" / "config.json").exists()


def test_resume_of_a_run_directory_names_its_checkpoints(small_run, tmp_path):
    """``--resume RUN_DIR`` said "complete checkpoints in <its parent>: none" although the run holds two: the
    refusal now lists the run's own."""
    line = refusal(train_1rank(tmp_path / "new", resume=str(small_run)))
    assert f"resume checkpoint '{small_run}' is not a checkpoint but holds checkpoints: name one" in line, line
    assert f"complete checkpoints in {small_run / 'checkpoints'}: step_00000002, step_00000004" in line


def test_resume_auto_with_no_checkpoint_that_verifies_is_refused(small_run, tmp_path):
    """``--resume auto`` falls back to an older checkpoint when the newest is corrupt; when every one is, starting
    over would silently drop the run's metrics (and keep training into a directory of corrupt checkpoints)."""
    run = shutil.copytree(small_run, tmp_path / "run")
    for step in ("step_00000002", "step_00000004"):
        flip(run / "checkpoints" / step / ADAPTER_FILE)
    before = tree_digest(run)
    line = refusal(train_1rank(run, resume="auto"))
    assert f"none of the 2 checkpoints in {run / 'checkpoints'} verifies" in line and "--overwrite" in line
    assert tree_digest(run) == before


def test_resuming_an_older_checkpoint_of_the_run_is_refused_and_changes_nothing(small_run, tmp_path):
    """``--resume .../step_00000002`` while step_00000004 is there replaced step 4 with the resumed run's and dropped
    its metrics lines without a word: refused (nothing changed), naming the later checkpoint and the ways out; the
    same checkpoint continued into another output_dir trains."""
    run = shutil.copytree(small_run, tmp_path / "run")
    older = run / "checkpoints" / "step_00000002"
    before = tree_digest(run)
    line = refusal(train_1rank(run, "train.lr=1e-3", resume=str(older)))
    assert f"--resume {older} (step 2): {run / 'checkpoints'} holds later checkpoints (step_00000004)" in line, line
    assert "--resume auto" in line and tree_digest(run) == before
    elsewhere = train_1rank(tmp_path / "elsewhere", resume=str(older))
    assert elsewhere.returncode == 0, elsewhere.stdout[-3000:] + elsewhere.stderr[-3000:]
    assert (tmp_path / "elsewhere" / "checkpoints" / "step_00000004").is_dir()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_anything_is_written(tmp_path):
    """The shipped tokenizer on a model of 100 token ids failed with an IndexError in the first step's embedding
    (a device-side assert on a GPU), after the model was loaded and its random base saved."""
    line = refusal(train_1rank(tmp_path / "run", "model.config.vocab_size=100"))
    assert "the tokenizer in data/arith/tokenizer has" in line and "more than the model's vocab_size=100" in line
    assert not (tmp_path / "run").exists()


def test_a_resume_on_other_data_is_refused_before_the_weights_load(small_run, tmp_path):
    """Another data.seed (or train file) on resume ended in a ValueError traceback from the data iterator once the
    whole model was loaded: a one-line refusal now, saying what to do, and nothing changed."""
    run = shutil.copytree(small_run, tmp_path / "run")
    before = tree_digest(run)
    line = refusal(train_1rank(run, "train.max_steps=6", "data.seed=1", resume="auto"))
    assert "step_00000004: cannot resume: the data changed since the checkpoint (saved seed is 0, now 1)" in line
    assert "init_adapter:" in line and tree_digest(run) == before


@pytest.mark.parametrize("cut", [4, 1000, -1], ids=["no-header", "cut-header", "cut-tensors"])
def test_a_base_file_cut_short_is_refused_by_name_before_the_data_is_built(hf_base, tmp_path, cut):
    """A model.safetensors cut short by a copy or download ended in safetensors' "incomplete metadata, file not fully
    covered" traceback once the data was built: refused by name, from the file's header, before anything is done."""
    base = shutil.copytree(hf_base, tmp_path / "base")
    weights = base / "model.safetensors"
    os.truncate(weights, cut if cut > 0 else weights.stat().st_size + cut)
    line = refusal(train_1rank(tmp_path / "run", f"model.path={base}"))
    assert f"model.path={base}: {weights} " in line and ("is cut short" in line or "not a whole safetensors" in line)
    assert "tokenising" not in line and not (tmp_path / "run").exists()


def test_resuming_a_finished_run_changes_no_file(small_run, tmp_path):
    """``--resume auto`` on a run whose newest checkpoint is at train.max_steps used to evaluate and save again and
    rewrite summary.json (tokens 0, throughput NaN) and loss.png: it must say there is nothing to do and change
    nothing."""
    run = shutil.copytree(small_run, tmp_path / "run")
    before = tree_digest(run)
    proc = train_1rank(run, resume="auto")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"{run / 'checkpoints/step_00000004'} is at step 4: the run already finished (train.max_steps=4), "
            "nothing to do") in proc.stderr and "raise train.max_steps to continue it" in proc.stderr
    assert tree_digest(run) == before


def test_a_resume_with_another_schedule_warns_and_follows_this_runs_settings(small_run, tmp_path):
    """Raising train.max_steps re-stretches the cosine (the rate jumps from its floor back up), and a new train.lr
    used to be dropped silently (the schedule's saved state brought the old peak back): the resume warns, naming the
    settings and both rates, and the logged rates follow this run's schedule. The resumed run's summary counts the
    checkpoint it read."""
    run = shutil.copytree(small_run, tmp_path / "run")
    proc = train_1rank(run, "train.max_steps=8", "train.lr=0.02", resume="auto")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.lr: checkpoint 0.01, this run 0.02; train.max_steps: checkpoint 4, this run 8" in proc.stderr
    assert (f"from step 6 on the rate is {cosine_rate(5, 8, lr=0.02):.6g} where the checkpoint's run would use "
            f"{cosine_rate(5, 4):.6g}") in proc.stderr
    logged = {r["step"]: r["lr"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(logged) == list(range(1, 9))
    assert logged[4] == pytest.approx(cosine_rate(3, 4), rel=1e-6)  # the first run's
    for step in range(6, 9):  # the rate logged at a step is the one it used (after step - 1 scheduler steps)
        assert logged[step] == pytest.approx(cosine_rate(step - 1, 8, lr=0.02), rel=1e-6), step
    read = sum(entry["size"] for entry in json.loads((run / "checkpoints/step_00000004/manifest.json").read_text())[
        "files"])
    assert strict_json(run / "summary.json")["checkpoint_gib_read"] == round(read / 2**30, 3) > 0


def test_summary_figures_agree_with_each_other(small_run):
    """summary.json gave tokens_per_s 2009 beside tokens_per_s_per_gpu 22042 on one process: two time bases (the
    whole run against the median step) and two token counts (real against padded) under one name. Each figure must
    follow from the others as its definition says (Reporter.summary), and the base precision be the run's."""
    summary = strict_json(small_run / "summary.json")
    logged = [r["tokens"] for r in read_metrics(small_run / "metrics.jsonl") if r["split"] == "train"]
    assert summary["tokens"] == logged[-1] and summary["steps"] == 4 and summary["world_size"] == 1
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"], rel=1e-3)
    per_step = summary["tokens"] / summary["steps"]
    assert summary["step_tokens_per_s_per_gpu"] == pytest.approx(
        per_step / summary["step_s_median"] / summary["world_size"], rel=2e-3)
    assert "tokens_per_s_per_gpu" not in summary
    assert summary["base_precision"] == "fp32"  # configs/tiny-cpu.yaml: model.dtype float32
    assert summary["checkpoint_gib_read"] == 0.0  # a random base is drawn, and nothing was resumed


def test_summary_json_is_strict_json_when_a_figure_is_not_finite(tmp_path):
    """A figure that cannot be had (no step timed, a diverged eval loss) is written as null: NaN is not JSON."""
    from miss_ds.train.metrics import MetricsLogger
    from miss_ds.train.reporter import Reporter
    from tests.conftest import tiny_llama_config

    reporter = Reporter(MetricsLogger(tmp_path, tensorboard=False), total_steps=1, initial_step=0, every_steps=1,
                        progress=False, tokens_seen=0)
    reporter.summary(tmp_path, steps=0, tokens_seen=0, world=1, model_config=tiny_llama_config(), seq_len=16,
                     device=torch.device("cpu"), dtype=torch.float32, extra={"eval_loss": float("nan")})
    summary = strict_json(tmp_path / "summary.json")
    assert summary["eval_loss"] is None and summary["step_s_median"] is None and summary["mfu"] is None


@pytest.mark.parametrize("dtype, precision, held_in", [("float32", "bf16", "fp32"), ("bfloat16", "bf16", "bf16"),
                                                       ("bfloat16", "fp8", "fp8")])
def test_the_summary_names_the_precision_the_base_is_held_in(dtype, precision, held_in):
    from miss_ds.run_config import ModelConfig
    from miss_ds.train.trainer import base_precision

    assert base_precision(ModelConfig(dtype=dtype, base_precision=precision)) == held_in


# ---------------------------------------------------------------------------------- soak
SOAK_STEPS = int(os.environ.get("MISS_DS_SOAK_STEPS", "2000"))


def sample_workers(launcher: subprocess.Popen, every: float = 2.0) -> dict[int, list[tuple[float, int, int]]]:
    """Until the launcher exits: (seconds, RSS bytes, open fds) of each rank, every ``every`` seconds."""
    samples: dict[int, list[tuple[float, int, int]]] = {}
    start = time.time()
    while launcher.poll() is None:
        try:
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                       if any(a.startswith("--local_rank") for a in p.cmdline())]
            for rank, p in enumerate(sorted(workers, key=lambda p: p.pid)):
                samples.setdefault(rank, []).append((time.time() - start, p.memory_info().rss, p.num_fds()))
        except psutil.Error:
            pass
        time.sleep(every)
    return samples


def quarters(rows: list[tuple[float, int, int]]) -> dict:
    """Second- against last-quarter figures of one rank's samples (the first quarter is warm-up)."""
    n = len(rows)
    q2, q4 = rows[n // 4: n // 2], rows[3 * n // 4:]
    rss2, rss4 = statistics.median(r[1] for r in q2), statistics.median(r[1] for r in q4)
    return {"samples": n, "rss_q2_mib": round(rss2 / 2**20, 1), "rss_q4_mib": round(rss4 / 2**20, 1),
            "rss_growth": round(rss4 / rss2 - 1, 4), "rss_max_mib": round(max(r[1] for r in rows) / 2**20, 1),
            "fds_q2_max": max(r[2] for r in q2), "fds_q4_max": max(r[2] for r in q4)}


@pytest.mark.skipif(not SOAK, reason="soak run of several minutes: set MISS_DS_SOAK=1")
def test_soak_memory_and_file_descriptors_stay_flat(tmp_path):
    """Thousands of 2-rank steps with a checkpoint every 5 and an eval every 100: per rank, the last quarter's
    median RSS is within 10% of the second quarter's, and the open-fd count does not grow."""
    out = tmp_path / "soak"
    cmd = train_cmd(2, out, f"train.max_steps={SOAK_STEPS}", "checkpoint.every_steps=5", "checkpoint.keep_last=2",
                    "eval.every_steps=100", "eval.max_batches=2", "train.warmup_steps=10")
    start = time.time()
    launcher = launch(cmd, tmp_path / "soak.log")
    try:
        samples = sample_workers(launcher)
    finally:
        kill_tree(launcher)
        release_shm(port_of(cmd))
    assert launcher.returncode == 0, (tmp_path / "soak.log").read_text()[-3000:]
    assert last_train_step(out) == SOAK_STEPS and len(samples) == 2
    report = {"steps": SOAK_STEPS, "seconds": round(time.time() - start),
              "ranks": {rank: quarters(rows) for rank, rows in samples.items()}}
    print("\nsoak: " + json.dumps(report))
    for rank, figures in report["ranks"].items():
        assert figures["samples"] >= 40, (rank, figures)
        assert figures["rss_growth"] < 0.10, (rank, figures)
        assert figures["fds_q4_max"] <= figures["fds_q2_max"] + 4, (rank, figures)
