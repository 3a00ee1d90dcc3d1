"""CheckpointManager: atomic saves, pruning, verification, crash and disk-full behaviour, 2-rank saves, RNG; what the
readers of a training checkpoint verify, and the resume checks that need no model (random base settings, LR
schedule)."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from miss_ds import atomic as checkpoint
from miss_ds.atomic import (CheckpointError, CheckpointManager, DiskFullError, read_manifest, rng_state,
                                set_rng_state, verify)
from miss_ds.checkpoint_files import adapter_dir
from miss_ds.train.preflight import check_base_layout
from miss_ds.train.schedule import schedule_change

HAS_DEV_FULL = os.path.exists("/dev/full")


def writer(files: dict[str, bytes]) -> Callable[[Path], None]:
    """A write_fn that writes ``files`` (relative path -> content) into the temp dir."""
    def write(directory: Path) -> None:
        for name, data in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
    return write


def names(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def temp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".tmp-*"))


def flip(file: Path) -> None:
    """Invert one byte in the middle of ``file``: same size, another sha256."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


# -- single process ---------------------------------------------------------------------------------

def test_save_writes_complete_checkpoint_with_manifest(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", tp_size=2)
    files = {"model.bin": b"weights" * 100, "optim/state.bin": b"\x00\x01" * 7}
    path = manager.save(7, writer(files), metadata={"tokens_seen": 1234})

    assert path == tmp_path / "ckpt" / "step_00000007" and path.is_dir()
    manifest = read_manifest(path)
    assert (manifest["step"], manifest["world_size"], manifest["tp_size"]) == (7, 1, 2)
    assert manifest["metadata"] == {"tokens_seen": 1234}
    assert manifest["files"] == [
        {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in sorted(files.items())]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.bin", "optim"]
    assert verify(path) == manifest
    assert temp_dirs(tmp_path / "ckpt") == []


def test_keep_last_prunes_oldest_and_latest_is_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, writer({"w.bin": bytes([step]) * 10}))
    assert names(manager.checkpoints()) == ["step_00000003", "step_00000004"]
    assert manager.latest() == tmp_path / "step_00000004"
    assert temp_dirs(tmp_path) == []


def test_keep_last_null_in_the_run_config_keeps_every_checkpoint(tmp_path):
    """``checkpoint.keep_last: null`` reaches the manager as None, which deletes nothing."""
    from miss_ds.run_config import load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    keep_last = load_config(config, ["checkpoint.keep_last=null"]).checkpoint.keep_last
    manager = CheckpointManager(tmp_path, keep_last=keep_last)
    for step in (1, 2, 3, 4):
        manager.save(step, writer({"w.bin": bytes([step]) * 10}))
    assert keep_last is None and len(manager.checkpoints()) == 4


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(10, writer({"w.bin": b"a"}))
    manager.save(5, writer({"w.bin": b"b"}))  # older step than the newest one on disk
    assert names(manager.checkpoints()) == ["step_00000005", "step_00000010"]
    manager.save(6, writer({"w.bin": b"c"}))
    assert names(manager.checkpoints()) == ["step_00000006", "step_00000010"]


def test_saving_a_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(3, writer({"w.bin": b"old"}))
    path = manager.save(3, writer({"w.bin": b"newer"}))
    assert (path / "w.bin").read_bytes() == b"newer"
    assert verify(path)["files"][0]["size"] == 5
    assert names(manager.checkpoints()) == ["step_00000003"] and temp_dirs(tmp_path) == []


def test_stale_temp_dirs_are_removed_by_rank0s_first_save_only(tmp_path):
    """What interrupted saves left is removed when rank 0 saves; a manager that only reads (a tool, a resume's
    lookup) removed it too, which could be the save of a run in progress."""
    for name in (".tmp-step_00000005", ".tmp-discard-step_00000001-ab12"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial.bin").write_bytes(b"x")
    CheckpointManager(tmp_path, rank=1, world_size=2, barrier=lambda: None)
    reader = CheckpointManager(tmp_path)
    assert reader.latest() is None and reader.checkpoints() == [] and len(temp_dirs(tmp_path)) == 2
    CheckpointManager(tmp_path).save(1, writer({"model.bin": b"x"}))
    assert temp_dirs(tmp_path) == []


# -- verification and resume ------------------------------------------------------------------------

@pytest.fixture
def two_checkpoints(tmp_path) -> CheckpointManager:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2):
        manager.save(step, writer({"model.bin": bytes(range(256)) * 4, "extra.json": b"{}"}))
    return manager


def test_truncated_file_is_skipped_by_latest_and_named_by_verify(two_checkpoints, caplog):
    manager = two_checkpoints
    bad = manager.step_path(2)
    with open(bad / "model.bin", "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING, logger="miss_ds.atomic"):
        assert manager.latest() == manager.step_path(1)
    assert "step_00000002" in caplog.text and "model.bin" in caplog.text
    with pytest.raises(CheckpointError, match=r"'model.bin' has 100 bytes.*1024"):
        verify(bad)
    with pytest.raises(CheckpointError, match=r"model\.bin.*resume='auto'.*step_00000001"):
        manager.resolve(str(bad))


def test_same_size_corruption_needs_full_verification(two_checkpoints):
    manager = two_checkpoints
    bad = manager.step_path(2)
    data = bytearray((bad / "model.bin").read_bytes())
    data[10] ^= 0xFF
    (bad / "model.bin").write_bytes(bytes(data))
    verify(bad, full=False)  # sizes still match
    with pytest.raises(CheckpointError, match=r"'model.bin' does not match its sha256"):
        verify(bad, full=True)
    assert manager.latest(full=False) == bad
    assert manager.latest(full=True) == manager.step_path(1)


def test_missing_file_and_missing_manifest(two_checkpoints):
    manager = two_checkpoints
    (manager.step_path(2) / "extra.json").unlink()
    with pytest.raises(CheckpointError, match=r"'extra.json' .* is missing"):
        verify(manager.step_path(2))
    (manager.step_path(1) / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        manager.resolve(str(manager.step_path(1)))
    assert manager.latest() is None


def test_resolve(two_checkpoints, tmp_path, monkeypatch):
    manager = two_checkpoints
    assert manager.resolve(None) is None
    assert manager.resolve("auto") == manager.step_path(2)
    assert manager.resolve("step_00000001") == manager.step_path(1)  # relative to root
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'step_00000009' not found.*resume='auto'"):
        manager.resolve("step_00000009")
    assert CheckpointManager(tmp_path / "empty").resolve("auto") is None


def test_a_bad_resume_path_lists_the_complete_checkpoints_of_its_own_directory(tmp_path):
    """The hint names the checkpoints beside the path the user gave (not the new run's own), verified as the resume
    verifies them: a checkpoint with a flipped byte is not offered as complete."""
    other = CheckpointManager(tmp_path / "other")
    for step in (1, 2):
        other.save(step, writer({"model.bin": bytes(range(256)) * 4}))
    flip(other.step_path(2) / "model.bin")
    ours = CheckpointManager(tmp_path / "ours")
    ours.save(7, writer({"model.bin": b"ours"}))
    for named, problem in ((other.step_path(9), "not found"), (other.step_path(2), "does not match its sha256")):
        with pytest.raises(CheckpointError) as info:
            ours.resolve(str(named), full=True)
        message = str(info.value)
        assert problem in message and str(named) in message
        assert f"(complete checkpoints in {other.root}: step_00000001)." in message
        assert "step_00000007" not in message
    with pytest.raises(CheckpointError, match=r"there is no directory .*nowhere"):
        ours.resolve(str(tmp_path / "nowhere" / "step_00000001"), full=True)


def test_verify_only_checks_the_files_named_and_needs_them_listed(tmp_path):
    """``only`` limits verification to what a reader reads (a directory means the files under it, not a file whose
    name merely starts the same), and a file on disk the manifest lacks is an error, not a silent pass (one on
    neither is not read, so not an error)."""
    path = CheckpointManager(tmp_path).save(1, writer({"adapter/d.bin": b"d" * 64, "adapterx.bin": b"x" * 64,
                                                       "optimizer/m.bin": b"m" * 64}))
    flip(path / "adapterx.bin")
    flip(path / "optimizer/m.bin")
    verify(path, only=["adapter"])
    flip(path / "adapter/d.bin")
    with pytest.raises(CheckpointError, match=r"'adapter/d.bin' does not match its sha256"):
        verify(path, only=["adapter"])
    with pytest.raises(CheckpointError, match=r"'optimizer/m.bin' does not match its sha256"):
        verify(path, only=["optimizer/m.bin"])
    verify(path, only=["trainer_state.json"])  # on neither: not read
    (path / "trainer_state.json").write_text("{}")  # put there after the save: read, but never checked
    with pytest.raises(CheckpointError, match=r"lists no file 'trainer_state.json'"):
        verify(path, only=["trainer_state.json"])


def _training_checkpoint(root: Path) -> Path:
    """A checkpoint laid out as a training checkpoint (checkpoint_files), its files' contents irrelevant here."""
    return CheckpointManager(root).save(3, writer({
        "adapter/adapter_config.json": b"{}", "adapter/tp00-of-01.safetensors": b"D" * 256,
        "optimizer/exp_avg/tp00-of-01.safetensors": b"m" * 256, "trainer_state.json": b"{}"}))


@pytest.mark.parametrize("damaged", ["adapter/tp00-of-01.safetensors", "adapter/adapter_config.json",
                                     "trainer_state.json"])
def test_an_adapter_is_read_only_once_its_files_match_their_sha256(tmp_path, damaged):
    """A flipped byte in what an adapter reader reads (the adapter, and the run config in trainer_state.json) keeps
    every size: the reader (convert, reshard, eval, generate, init_adapter: ``adapter_dir``) must refuse it by name,
    given the checkpoint or its adapter/ directory."""
    path = _training_checkpoint(tmp_path / "ckpt")
    for given in (path, path / "adapter"):
        assert adapter_dir(given) == path / "adapter"
    flip(path / "optimizer/exp_avg/tp00-of-01.safetensors")  # what adapter readers do not read is not hashed
    assert adapter_dir(path) == path / "adapter"
    flip(path / damaged)
    for given in (path, path / "adapter"):
        with pytest.raises(CheckpointError, match=re.escape(f"{path} is corrupt: file '{damaged}' does not match")):
            adapter_dir(given)


def test_an_adapter_outside_a_training_checkpoint_is_read_as_it_is(tmp_path):
    """A bare adapter directory (an export, a copy) has no manifest to check against; a training checkpoint whose
    manifest is gone is incomplete and refused."""
    path = _training_checkpoint(tmp_path / "ckpt")
    bare = shutil.copytree(path / "adapter", tmp_path / "copy" / "adapter")
    assert adapter_dir(bare) == bare and adapter_dir(bare.parent) == bare
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        adapter_dir(path)


# -- resume checks on the recorded config -------------------------------------------------------------

RANDOM = {"seed": 0, "model": {"path": None, "random_init": False,
                               "config": {"model_type": "llama", "num_hidden_layers": 2}}}


def test_a_resume_that_draws_another_random_base_is_refused_naming_each_setting():
    """A random base is drawn from the seed and model.config: a resume that changes them would train the checkpoint's
    D on another base. Refused naming every changed key and the --set that restores it."""
    state = {"tp_size": 1, "config": RANDOM}
    check_base_layout(state, 1, json.loads(json.dumps(RANDOM)), Path("ckpt"))
    changed = {"seed": 1, "model": {"path": None, "random_init": False,
                                    "config": {"model_type": "llama", "num_hidden_layers": 3, "head_dim": 8}}}
    with pytest.raises(ValueError) as info:
        check_base_layout(state, 1, changed, Path("ckpt"))
    message = str(info.value)
    assert message.startswith("cannot resume ckpt: its base has random weights")
    for part in ("seed: checkpoint 0, this config 1", "model.config.head_dim: checkpoint unset, this config 8",
                 "model.config.num_hidden_layers: checkpoint 2, this config 3", "--set seed=0",
                 "--set model.config.num_hidden_layers=2", "remove model.config.head_dim"):
        assert part in message, part
    real = {"seed": 0, "model": {"path": "/models/llama", "random_init": False, "config": {}}}
    check_base_layout({"tp_size": 1, "config": real}, 1, {**real, "seed": 1}, Path("ckpt"))  # the seed draws nothing


def test_a_random_base_run_resumes_on_another_tp_size_from_the_base_it_saved():
    """Drawing the random base again at another TP size builds another base: refused, pointing at the base the run
    saved; loading that base (model.path) resumes at any TP size (its fingerprint is checked after loading)."""
    state = {"tp_size": 1, "config": RANDOM}
    with pytest.raises(ValueError, match=r"with parallel.tp_size=2: this config draws random base weights .* load the "
                                         r"base from a checkpoint \(the run saved its random base: "
                                         r"model.path=run/base\)"):
        check_base_layout(state, 2, json.loads(json.dumps(RANDOM)), Path("run/checkpoints/step_00000004"))
    saved_base = {**RANDOM, "model": {**RANDOM["model"], "path": "run/base"}}
    check_base_layout(state, 2, saved_base, Path("run/checkpoints/step_00000004"))


def _cosine(step: int, max_steps: int, lr: float = 0.01, warmup: int = 1, floor: float = 0.1) -> float:
    """The cosine schedule's rate after ``step`` scheduler steps, written out (past warm-up)."""
    progress = min(1.0, (step - warmup) / (max_steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_a_changed_schedule_is_named_with_the_rates_before_and_after():
    """Raising train.max_steps to go on re-stretches the cosine: the warning names the setting and the rate of the
    first step the new schedule sets, against the old schedule's."""
    saved = {"lr": 0.01, "schedule": "cosine", "warmup_steps": 1, "max_steps": 4, "min_lr_ratio": 0.1}
    assert schedule_change(saved, dict(saved), 4) is None
    assert schedule_change({}, saved, 4) is None  # a checkpoint that records no schedule: nothing to compare
    message = schedule_change(saved, {**saved, "max_steps": 8}, 4)
    assert "train.max_steps: checkpoint 4, this run 8" in message
    assert f"from step 6 on the rate is {_cosine(5, 8):.6g} where the checkpoint's run would use " \
           f"{_cosine(5, 4):.6g}" in message
    assert _cosine(5, 4) == pytest.approx(0.001)  # the old schedule had ended at its floor


# -- failures ---------------------------------------------------------------------------------------

def _raise_enospc(directory: Path) -> None:
    (directory / "model.bin").write_bytes(b"x" * 3000)
    raise OSError(errno.ENOSPC, "No space left on device")


def _write_to_dev_full(directory: Path) -> None:
    (directory / "model.bin").write_bytes(b"x" * 3000)
    os.symlink("/dev/full", directory / "optim.bin")
    with open(directory / "optim.bin", "wb") as f:  # the kernel answers ENOSPC
        f.write(b"y" * 10_000)


@pytest.mark.parametrize("write_fn", [
    _raise_enospc,
    pytest.param(_write_to_dev_full, marks=pytest.mark.skipif(not HAS_DEV_FULL, reason="no /dev/full")),
])
def test_disk_full_in_write_fn_keeps_previous_checkpoints(tmp_path, write_fn):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, writer({"model.bin": b"m" * 5000}))
    with pytest.raises(DiskFullError) as info:
        manager.save(2, write_fn)
    message = str(info.value)
    assert "disk full" in message and ".tmp-step_00000002" in message
    assert "2.9 KiB had been written" in message and "step_00000001 has 4.9 KiB" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert names(manager.checkpoints()) == ["step_00000001"] and temp_dirs(tmp_path) == []
    verify(manager.step_path(1), full=True)


def test_disk_full_while_writing_manifest(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(1, writer({"model.bin": b"m"}))

    def no_space(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(checkpoint, "_write_json", no_space)
    with pytest.raises(DiskFullError, match="disk full while saving checkpoint step 2"):
        manager.save(2, writer({"model.bin": b"m" * 10}))
    assert names(manager.checkpoints()) == ["step_00000001"] and temp_dirs(tmp_path) == []


@pytest.mark.skipif(not HAS_DEV_FULL, reason="no /dev/full")
@pytest.mark.parametrize("free_bytes, expected", [(1000, DiskFullError), (10 * 2**30, RuntimeError)])
def test_torch_save_error_counts_as_disk_full_only_when_space_is_low(tmp_path, monkeypatch, free_bytes, expected):
    manager = CheckpointManager(tmp_path)

    def torch_save_to_full_disk(directory: Path) -> None:
        os.symlink("/dev/full", directory / "model.pt")
        torch.save({"w": torch.zeros(100_000)}, directory / "model.pt")  # RuntimeError without errno
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: free_bytes)
    with pytest.raises(RuntimeError) as info:
        manager.save(1, torch_save_to_full_disk)
    assert type(info.value) is expected
    assert manager.checkpoints() == [] and temp_dirs(tmp_path) == []


def test_other_errors_propagate_unchanged_and_leave_nothing(tmp_path):
    manager = CheckpointManager(tmp_path)

    def broken(directory: Path) -> None:
        (directory / "half.bin").write_bytes(b"x")
        raise ValueError("bug in write_fn")
    with pytest.raises(ValueError, match="bug in write_fn"):
        manager.save(1, broken)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        manager.save(2, writer({"a": b"1"}), metadata={"bad": object()})
    assert manager.checkpoints() == [] and temp_dirs(tmp_path) == []


_CRASHING_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from miss_ds import atomic as checkpoint

    root, phase = sys.argv[1], sys.argv[2]

    def wait_for_kill():
        print("READY", flush=True)
        time.sleep(60)

    def write_fn(directory):
        with open(directory / "model.bin", "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            if phase == "write":
                wait_for_kill()
            f.write(b"y" * 4096)

    real_rename = os.rename
    def rename(src, dst):
        if phase == "rename" and Path(dst).name.startswith("step_"):
            wait_for_kill()
        real_rename(src, dst)
    checkpoint.os.rename = rename

    checkpoint.CheckpointManager(root).save(2, write_fn)
""")


@pytest.mark.parametrize("phase, written, temp_has_manifest", [("write", 4096, False), ("rename", 8192, True)])
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, phase, written, temp_has_manifest):
    CheckpointManager(tmp_path).save(1, writer({"model.bin": b"old"}))
    child = subprocess.Popen([sys.executable, "-c", _CRASHING_CHILD, str(tmp_path), phase],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    temp = tmp_path / ".tmp-step_00000002"
    assert (temp / "model.bin").stat().st_size == written  # the crash really was mid-save
    assert (temp / "manifest.json").exists() == temp_has_manifest
    assert not (tmp_path / "step_00000002").exists()
    manager = CheckpointManager(tmp_path)  # a restarted run
    assert manager.latest() == tmp_path / "step_00000001"
    manager.save(3, writer({"model.bin": b"new"}))  # its first save clears what the killed one left
    assert temp_dirs(tmp_path) == [] and manager.latest() == tmp_path / "step_00000003"


# -- two ranks --------------------------------------------------------------------------------------

def _two_rank_worker(rank: int, root: str, store_file: str, results_dir: str) -> None:
    import torch.distributed as dist

    store = dist.FileStore(store_file, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    manager = CheckpointManager(root, keep_last=2, rank=rank, world_size=2, barrier=dist.barrier, tp_size=2)
    results: dict[str, object] = {}

    def outcome(step: int, write_fn: Callable[[Path], None]) -> list:
        try:
            return ["ok", str(manager.save(step, write_fn, metadata={"rank0_says": "hi"}))]
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            return [type(exc).__name__, str(exc)]

    results["good"] = outcome(1, writer({f"rank{rank}.bin": bytes([rank]) * (1000 * (rank + 1))}))

    def rank1_disk_full(directory: Path) -> None:
        (directory / f"rank{rank}.bin").write_bytes(b"partial")
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
    results["rank1_disk_full"] = outcome(2, rank1_disk_full)

    def rank0_bug(directory: Path) -> None:
        if rank == 0:
            raise ValueError("bug on rank 0")
        (directory / "rank1.bin").write_bytes(b"fine")
    results["rank0_bug"] = outcome(1, rank0_bug)  # re-saving step 1: rank 1 must not mistake the old one

    (Path(results_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_two_ranks_write_one_checkpoint_and_fail_together(tmp_path):
    root, results_dir = tmp_path / "ckpt", tmp_path / "results"
    results_dir.mkdir()
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(root), str(tmp_path / "store"), str(results_dir)),
                                nprocs=2, join=True)
    rank0, rank1 = (json.loads((results_dir / f"rank{r}.json").read_text()) for r in (0, 1))

    step1 = root / "step_00000001"
    assert rank0["good"] == rank1["good"] == ["ok", str(step1)]
    manifest = verify(step1, full=True)  # still the first save: the failed saves changed nothing
    assert (manifest["world_size"], manifest["tp_size"], manifest["metadata"]) == (2, 2, {"rank0_says": "hi"})
    assert [(f["path"], f["size"]) for f in manifest["files"]] == [("rank0.bin", 1000), ("rank1.bin", 2000)]

    assert rank1["rank1_disk_full"][0] == rank0["rank1_disk_full"][0] == "DiskFullError"
    assert "rank 1" in rank0["rank1_disk_full"][1] and "disk full" in rank0["rank1_disk_full"][1]

    assert rank0["rank0_bug"] == ["ValueError", "bug on rank 0"]
    assert rank1["rank0_bug"][0] == "CheckpointError" and "not committed" in rank1["rank0_bug"][1]

    assert names(CheckpointManager(root).checkpoints()) == ["step_00000001"] and temp_dirs(root) == []


# -- RNG --------------------------------------------------------------------------------------------

def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), float(np.random.randn()), torch.rand(3).tolist()


@pytest.mark.parametrize("roundtrip", ["memory", "pickle", "torch_weights_only"])
def test_rng_state_reproduces_draws(tmp_path, roundtrip):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must be captured too
    state = rng_state()
    expected = _draws()
    assert _draws() != expected  # the generators moved on
    if roundtrip == "pickle":
        state = pickle.loads(pickle.dumps(state))
    elif roundtrip == "torch_weights_only":
        torch.save(state, tmp_path / "rng.pt")
        state = torch.load(tmp_path / "rng.pt", weights_only=True)
    set_rng_state(state)
    assert _draws() == expected
